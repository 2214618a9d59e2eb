// gguf_model.h: keel GPT-2 <-> GGUF (llama.cpp architecture "gpt2").
//
// Tensors (keel name -> GGUF name, GGUF ne = {in, out} for keel's [out, in] matrices, so the bytes are the
// same row-major data):
//   wte -> token_embd.weight {C, V}          wpe -> position_embd.weight {C, ctx} (always F32)
//   h.N.ln1.*       -> blk.N.attn_norm.*     h.N.attn.qkv.* -> blk.N.attn_qkv.*  (rows q | k | v)
//   h.N.attn.proj.* -> blk.N.attn_output.*   h.N.ln2.*      -> blk.N.ffn_norm.*
//   h.N.mlp.fc.*    -> blk.N.ffn_up.*        h.N.mlp.proj.* -> blk.N.ffn_down.*
//   lnf.*           -> output_norm.*         (tied head)    -> output.weight {C, V}, a copy of token_embd
// 1-D tensors stay F32; matrices get the export dtype (Q8_0 falls back to F16 for a matrix whose row length is
// not a multiple of 32, as llama.cpp's converter does).
//
// Metadata: general.{architecture=gpt2, name, alignment=32, file_type, quantization_version=2},
// gpt2.{context_length, embedding_length, feed_forward_length=4C, block_count, attention.head_count,
// attention.layer_norm_epsilon=1e-5}, and a SentencePiece-style ("llama" = SPM) vocabulary:
// tokenizer.ggml.{model=llama, tokens, scores, token_type, add_bos_token=false, add_eos_token=false,
// add_space_prefix=false, remove_extra_whitespaces=false}, plus bos/eos/unknown_token_id for the BPE tokenizer.
// The token list always has exactly V entries (the rows of wte): ids past the tokenizer's vocabulary (a model
// padded with --vocab) become unused pieces "<pad_ID>" (token type 5, score 0).
//   - bpe: keel's SentencePiece pieces as they are ("▁the", "<0x0A>", "<unk>"/"<s>"/"</s>"), their scores and
//     types (1 normal, 2 unknown, 3 control, 6 byte); llama.cpp's SPM tokenizer merges by these scores.
//   - byte: the 256 pieces "<0x00>".."<0xFF>" of type 6 (byte), except id 32 (space), which is the normal
//     piece "▁" (U+2581): llama.cpp's SPM tokenizer first rewrites spaces as U+2581 and looks characters up as
//     pieces, falling back to byte pieces for the rest, so each byte becomes token id = byte value, exactly as
//     keel's byte tokenizer (except a literal U+2581 in the text, which llama.cpp reads as a space).
//     No special-token keys are written: llama.cpp then assumes its SPM defaults unk=0, bos=1, eos=2, i.e. the
//     bytes 0x00-0x02 (harmless for text; llama.cpp would stop generating at byte 0x02).
// keel-specific keys make the import exact: keel.tokenizer (u8 array: the tokenizer file's bytes),
// keel.tokenizer_type ("bpe"|"byte"), keel.config (model config JSON), keel.state (training state JSON).
#pragma once
#include <string>
#include <vector>

#include "export/export.h"
#include "export/gguf.h"

namespace keel {

// The GGUF file bytes for s.
Result<std::string> EncodeModelGguf(const TrainingSnapshot& s, ExportDtype dtype, const std::string& name);
Status ExportGguf(const TrainingSnapshot& s, const std::string& path, ExportDtype dtype, const std::string& name);

// Maps a parsed GGUF file back to keel (see LoadExportedModel).
Result<TrainingSnapshot> DecodeModelGguf(const GgufFile& f, std::vector<std::string>* warnings);
Result<TrainingSnapshot> ImportGguf(const std::string& path, std::vector<std::string>* warnings);

// keel parameter name -> GGUF tensor name ("" if unknown).
std::string GgufTensorName(const std::string& keel_name);

}  // namespace keel

// hf_export.h: keel GPT-2 <-> a Hugging Face transformers GPT-2 directory (GPT2LMHeadModel).
//
// Directory contents:
//   config.json            GPT2Config: model_type "gpt2", architectures ["GPT2LMHeadModel"], n_layer, n_head,
//                          n_embd, n_positions = n_ctx = ctx, vocab_size = model vocab (wte rows), n_inner null
//                          (= 4 n_embd), activation_function "gelu_new" (GELU, tanh form), layer_norm_epsilon
//                          1e-5, tie_word_embeddings true, bos/eos_token_id (null for the byte tokenizer).
//   model.safetensors      metadata {"format": "pt"}; names and layout of GPT2LMHeadModel's state dict:
//                            transformer.wte.weight [V, C]            transformer.wpe.weight [ctx, C]
//                            transformer.h.N.ln_1.{weight,bias}       transformer.h.N.ln_2.{weight,bias}
//                            transformer.h.N.attn.c_attn.weight [C, 3C]   .bias [3C]
//                            transformer.h.N.attn.c_proj.weight [C, C]    .bias [C]
//                            transformer.h.N.mlp.c_fc.weight    [C, 4C]   .bias [4C]
//                            transformer.h.N.mlp.c_proj.weight  [4C, C]   .bias [C]
//                            transformer.ln_f.{weight,bias}
//                          GPT-2's Conv1D stores weights [in, out]: the TRANSPOSE of keel's [out, in]. The tied
//                          lm_head.weight is not stored (transformers re-ties it). dtype F32 or F16.
//   tokenizer.model        keel's tokenizer file, verbatim (a SentencePiece model for bpe).
//   tokenizer_config.json  for bpe: the sentencepiece-based LlamaTokenizer with no BOS/EOS added, legacy: true
//                          (plain SentencePiece encoding; keel's model has no dummy prefix). keel's own encoder
//                          additionally always encodes '\n' as <0x0A> and never lets a piece span lines, so HF's
//                          tokenization can differ from keel's on multi-line text; token ids mean the same.
//                          For byte: no Hugging Face tokenizer class reproduces keel's byte tokenizer (token id =
//                          byte value); the file says so (tokenizer_class null, keel_tokenizer_type "byte").
// Import accepts these names with or without the "transformer." prefix, F32/F16/BF16 tensors, and checks
// shapes; config.json must say gpt2 with a GELU-tanh activation.
#pragma once
#include <string>
#include <vector>

#include "export/export.h"

namespace keel {

Status ExportHfSafetensors(const TrainingSnapshot& s, const std::string& dir, ExportDtype dtype);
Result<TrainingSnapshot> ImportHfSafetensors(const std::string& dir, std::vector<std::string>* warnings);

// keel parameter name -> HF GPT-2 state-dict name, and whether the weight is stored transposed.
std::string HfTensorName(const std::string& keel_name, bool* transposed);

}  // namespace keel

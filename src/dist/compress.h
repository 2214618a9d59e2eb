// compress.h: lossy codecs for the gradient / pseudo-gradient exchange (`keel train --compress none|bf16|int8`)
// with error feedback, and the compressed sum over a group.
//
// Formats (little-endian, as this machine writes them):
//   bf16  2 bytes per value, round to nearest even (formats/half.h): relative error <= 2^-9.
//   int8  per chunk of kInt8Chunk values: one float scale s = max|x| / 127, then one int8 q = round(x / s) per
//         value (the last chunk may be shorter): absolute error <= s / 2 in each chunk.
// Error feedback (as in 1-bit SGD / EF-SGD, INTELLECT-1): each worker adds the quantisation error it made last
// time to what it sends next, so errors do not accumulate: the sum of decoded values over R rounds differs from
// the sum of inputs by the last round's residual only (at most one quantum). The residual is local to the
// worker. It is updated in two phases because a step attempt can be aborted after the exchange (a failed vote,
// a lost peer) and redone: Encode writes the new residual to a pending buffer, Commit() adopts it once the step
// was applied, and a redone attempt encodes again from the old residual.
// Summation: Gloo cannot add int8 or bf16 payloads (an int8 sum overflows, and it has no bf16 type), so
// compressed payloads are exchanged with an allgather and every member decodes and adds them in rank order, in
// double — identical on every member, and deterministic for a fixed group.
// Thread safety: an ErrorFeedback is used by one thread at a time (the communication thread during an exchange).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "dist/communicator.h"

namespace keel {

enum class Codec { kNone, kBf16, kInt8 };

inline constexpr size_t kInt8Chunk = 256;

Result<Codec> ParseCodec(const std::string& name);  // "none", "bf16", "int8"; errors name --compress
const char* CodecName(Codec c);

// Bytes of the encoded form of n values (kNone: 4 n).
size_t EncodedBytes(Codec c, size_t n);
void Encode(Codec c, const float* x, size_t n, uint8_t* out);
// acc[i] += w * decoded[i].
void DecodeAdd(Codec c, const uint8_t* in, size_t n, double w, double* acc);
void Decode(Codec c, const uint8_t* in, size_t n, float* out);

class ErrorFeedback {
 public:
  void Resize(size_t n);
  size_t size() const { return residual_.size(); }
  // Encodes x[0..n) + residual[off..off+n) into out; pending residual[off..) = that sum - its decoded value.
  void Encode(Codec c, const float* x, size_t off, size_t n, uint8_t* out);
  void Commit();  // the pending residual becomes the residual (call once the exchanged values were applied)
  void Reset();   // zero (a new lineage of state: after a state transfer or a rollback)
  const float* residual() const { return residual_.data(); }

 private:
  std::vector<float> residual_, pending_;
  std::vector<float> scratch_;
};

// sum[i] = sum over members (rank order, in double) of decode(encode(x[i] + residual)) — through `ef` when it is
// not null (error feedback), else without. header is a small value every member contributes as is (summed
// exactly in double, returned in *header_sum): the diloco token weights; weight_by_header: each member's
// decoded values are multiplied by its header before the sum. Exchanges one allgather of
// 8 + EncodedBytes(c, n) bytes per member.
Status CompressedSum(Communicator* comm, Codec c, const float* x, size_t off, size_t n, ErrorFeedback* ef,
                     float* sum, double header = 0, double* header_sum = nullptr, bool weight_by_header = false);

}  // namespace keel

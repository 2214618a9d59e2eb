// compress.cc: bf16/int8 codecs, error feedback and the allgather-based compressed sum (see compress.h).
#include "dist/compress.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <memory>

#include "formats/half.h"

namespace keel {

Result<Codec> ParseCodec(const std::string& name) {
  if (name == "none") return Codec::kNone;
  if (name == "bf16") return Codec::kBf16;
  if (name == "int8") return Codec::kInt8;
  return InvalidArgument("--compress must be none, bf16 or int8 (got '" + name + "')");
}

const char* CodecName(Codec c) {
  switch (c) {
    case Codec::kNone: return "none";
    case Codec::kBf16: return "bf16";
    case Codec::kInt8: return "int8";
  }
  return "?";
}

size_t EncodedBytes(Codec c, size_t n) {
  switch (c) {
    case Codec::kNone: return 4 * n;
    case Codec::kBf16: return 2 * n;
    case Codec::kInt8: return n + 4 * ((n + kInt8Chunk - 1) / kInt8Chunk);
  }
  return 0;
}

void Encode(Codec c, const float* x, size_t n, uint8_t* out) {
  switch (c) {
    case Codec::kNone:
      std::memcpy(out, x, 4 * n);
      return;
    case Codec::kBf16:
      // uint16 stores through memcpy: `out` carries no alignment promise.
      for (size_t i = 0; i < n; ++i) {
        const uint16_t h = FloatToBF16(x[i]);
        std::memcpy(out + 2 * i, &h, 2);
      }
      return;
    case Codec::kInt8:
      for (size_t c0 = 0; c0 < n; c0 += kInt8Chunk) {
        const size_t m = std::min(kInt8Chunk, n - c0);
        float amax = 0;
        bool finite = true;
        for (size_t i = 0; i < m; ++i) {
          amax = std::max(amax, std::fabs(x[c0 + i]));
          finite &= std::isfinite(x[c0 + i]);
        }
        // A non-finite value poisons its chunk's scale on purpose: the receiver sees non-finite values (the
        // trainer's checks catch non-finite inputs before they get here).
        if (!finite) amax = NAN;
        const float scale = amax > 0 || std::isnan(amax) ? amax / 127.0f : 0.0f;
        std::memcpy(out, &scale, 4);
        out += 4;
        // A subnormal scale (amax below ~3.7e-37) would make 1/scale infinite, and 0 * inf a NaN that clamps to
        // +127: such a chunk is sent as zeros (error feedback carries the tiny remainder).
        const float inv = scale >= FLT_MIN ? 1.0f / scale : 0.0f;
        for (size_t i = 0; i < m; ++i) {
          float q = std::nearbyint(x[c0 + i] * inv);
          q = std::max(-127.0f, std::min(127.0f, q));
          out[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
        }
        out += m;
      }
      return;
  }
}

void DecodeAdd(Codec c, const uint8_t* in, size_t n, double w, double* acc) {
  switch (c) {
    case Codec::kNone:
      for (size_t i = 0; i < n; ++i) {
        float v;
        std::memcpy(&v, in + 4 * i, 4);
        acc[i] += w * v;
      }
      return;
    case Codec::kBf16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, in + 2 * i, 2);
        acc[i] += w * BF16ToFloat(h);
      }
      return;
    case Codec::kInt8:
      for (size_t c0 = 0; c0 < n; c0 += kInt8Chunk) {
        const size_t m = std::min(kInt8Chunk, n - c0);
        float scale;
        std::memcpy(&scale, in, 4);
        in += 4;
        const double s = w * static_cast<double>(scale);
        for (size_t i = 0; i < m; ++i) acc[c0 + i] += s * static_cast<int8_t>(in[i]);
        in += m;
      }
      return;
  }
}

void Decode(Codec c, const uint8_t* in, size_t n, float* out) {
  std::vector<double> acc(n, 0.0);
  DecodeAdd(c, in, n, 1.0, acc.data());
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<float>(acc[i]);
}

void ErrorFeedback::Resize(size_t n) {
  residual_.assign(n, 0.0f);
  pending_.assign(n, 0.0f);
}

void ErrorFeedback::Encode(Codec c, const float* x, size_t off, size_t n, uint8_t* out) {
  if (residual_.size() < off + n) {
    residual_.resize(off + n, 0.0f);
    pending_.resize(off + n, 0.0f);
  }
  scratch_.resize(n);
  for (size_t i = 0; i < n; ++i) scratch_[i] = x[i] + residual_[off + i];
  keel::Encode(c, scratch_.data(), n, out);
  std::vector<double> dec(n, 0.0);
  DecodeAdd(c, out, n, 1.0, dec.data());
  for (size_t i = 0; i < n; ++i) {
    const float r = static_cast<float>(static_cast<double>(scratch_[i]) - dec[i]);
    pending_[off + i] = std::isfinite(r) ? r : 0.0f;  // a non-finite input must not poison later rounds
  }
}

void ErrorFeedback::Commit() { residual_.swap(pending_); pending_ = residual_; }

void ErrorFeedback::Reset() {
  std::fill(residual_.begin(), residual_.end(), 0.0f);
  std::fill(pending_.begin(), pending_.end(), 0.0f);
}

Status CompressedSum(Communicator* comm, Codec c, const float* x, size_t off, size_t n, ErrorFeedback* ef, float* sum,
                     double header, double* header_sum, bool weight_by_header) {
  const size_t block = 8 + EncodedBytes(c, n);
  std::vector<uint8_t> mine(block);
  std::memcpy(mine.data(), &header, 8);
  if (ef) ef->Encode(c, x, off, n, mine.data() + 8);
  else Encode(c, x, n, mine.data() + 8);
  const int N = comm->size();
  std::vector<uint8_t> all(block * static_cast<size_t>(N));
  KEEL_RETURN_IF_ERROR(comm->Allgather(mine.data(), all.data(), block));
  std::vector<double> acc(n, 0.0);
  double hs = 0;
  for (int k = 0; k < N; ++k) {
    const uint8_t* b = all.data() + block * static_cast<size_t>(k);
    double h;
    std::memcpy(&h, b, 8);
    hs += h;
    if (weight_by_header && h == 0) continue;  // a member without a contribution
    DecodeAdd(c, b + 8, n, weight_by_header ? h : 1.0, acc.data());
  }
  for (size_t i = 0; i < n; ++i) sum[i] = static_cast<float>(acc[i]);
  if (header_sum) *header_sum = hs;
  return Status::Ok();
}

}  // namespace keel

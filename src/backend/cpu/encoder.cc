// encoder.cc: token + position embedding lookup and its backward (scatter-add into wte/wpe).
#include <omp.h>

#include "backend/cpu/cpu_ops.h"

namespace keel::cpu {

void EncoderForward(float* out, const int32_t* tokens, const int32_t* positions, const float* wte, const float* wpe, int B, int T, int C) {
#pragma omp parallel for schedule(static) if (static_cast<size_t>(B) * T * C >= 32768)
  for (int n = 0; n < B * T; ++n) {
    const float* te = wte + static_cast<size_t>(tokens[n]) * C;
    const float* pe = wpe + static_cast<size_t>(positions ? positions[n] : n % T) * C;
    float* o = out + static_cast<size_t>(n) * C;
    for (int c = 0; c < C; ++c) o[c] = te[c] + pe[c];
  }
}

void EncoderBackward(float* dwte, float* dwpe, const float* dout, const int32_t* tokens, int B, int T, int C) {
  // Partition by channel: every thread walks all positions in order for its channel slice, so each
  // scatter-add happens in the same order whatever the thread count.
#pragma omp parallel
  {
    int nt = omp_get_num_threads(), id = omp_get_thread_num();
    int c0 = static_cast<int>(static_cast<int64_t>(C) * id / nt), c1 = static_cast<int>(static_cast<int64_t>(C) * (id + 1) / nt);
    for (int n = 0; n < B * T; ++n) {
      const float* d = dout + static_cast<size_t>(n) * C;
      float* te = dwte + static_cast<size_t>(tokens[n]) * C;
      float* pe = dwpe + static_cast<size_t>(n % T) * C;
      for (int c = c0; c < c1; ++c) {
        te[c] += d[c];
        pe[c] += d[c];
      }
    }
  }
}

}  // namespace keel::cpu

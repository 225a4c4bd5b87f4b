// The FMA loop of the peak measurement, compiled per ISA (namespace FL_CPU_NS).
#include "common/fma_peak.h"

namespace fastlayers::FL_CPU_NS {
namespace {

#if defined(FL_CPU_ISA_avx512)
constexpr int kLanes = 16;
#elif defined(FL_CPU_ISA_avx2)
constexpr int kLanes = 8;
#else
constexpr int kLanes = 4;  // SSE2, which every x86-64 has (no FMA: mul + add)
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));
// Independent accumulators: enough to cover FMA latency (4 cycles) x 2 ports.
constexpr int kAccumulators = 12;

double run(int64_t iterations, float* sink) {
  Vec acc[kAccumulators];
  for (int k = 0; k < kAccumulators; ++k) acc[k] = Vec{} + 1.0f + 0.001f * k;
  // acc -> acc * a + b converges to b / (1 - a): the values stay normal and finite.
  Vec a = Vec{} + 0.999f;
  Vec b = Vec{} + 0.001f;
  for (int64_t i = 0; i < iterations; ++i) {
    for (int k = 0; k < kAccumulators; ++k) acc[k] = acc[k] * a + b;
    // Keeps the compiler from collapsing the iterations.
    __asm__ volatile("" : "+x"(a));
  }
  Vec total = Vec{};
  for (int k = 0; k < kAccumulators; ++k) total += acc[k];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += total[l];
  *sink = sum;
  return 2.0 * kLanes * kAccumulators * static_cast<double>(iterations);
}

}  // namespace

extern const FmaPeakKernels fma_peak_kernels;
const FmaPeakKernels fma_peak_kernels = {&run};

}  // namespace fastlayers::FL_CPU_NS

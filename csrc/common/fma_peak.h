// Measures this machine's fp32 FMA peak: the denominator of "% of peak" in the
// benchmarks. One loop per ISA (fma_peak_kernel.cpp), run on N threads at once.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"

namespace fastlayers {

struct FmaPeakKernels {
  // Runs `iterations` rounds of independent vector FMAs; returns the flops done and
  // writes a value derived from the accumulators (so the loop cannot be elided).
  double (*run)(int64_t iterations, float* sink);
};

// fp32 GFLOP/s with `threads` threads, each running for about `seconds`.
double measure_fma_peak_gflops(int threads, double seconds);

}  // namespace fastlayers

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::FmaPeakKernels, fma_peak_kernels)

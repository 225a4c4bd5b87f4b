#include "common/fma_peak.h"

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <thread>
#include <vector>

namespace fastlayers {

double measure_fma_peak_gflops(int threads, double seconds) {
  if (threads < 1) throw std::invalid_argument("threads must be >= 1");
  if (!(seconds > 0.0)) throw std::invalid_argument("seconds must be > 0");
  const FmaPeakKernels& kernels = fma_peak_kernels_select();
  using Clock = std::chrono::steady_clock;

  // Calibrate on one thread: grow the iteration count until one run takes ~seconds/4.
  float sink = 0.0f;
  int64_t iterations = 1 << 14;
  for (;;) {
    auto start = Clock::now();
    kernels.run(iterations, &sink);
    double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
    if (elapsed > seconds / 4 || iterations > (int64_t{1} << 40)) {
      iterations = std::max<int64_t>(1, static_cast<int64_t>(iterations * (seconds / std::max(elapsed, 1e-9))));
      break;
    }
    iterations *= 4;
  }

  std::vector<float> sinks(threads);
  std::vector<double> flops(threads);
  std::vector<std::thread> pool;
  auto start = Clock::now();
  for (int t = 0; t < threads; ++t) {
    pool.emplace_back([&, t] { flops[t] = kernels.run(iterations, &sinks[t]); });
  }
  for (auto& thread : pool) thread.join();
  double elapsed = std::chrono::duration<double>(Clock::now() - start).count();
  double total = 0.0;
  for (double f : flops) total += f;
  return total / elapsed * 1e-9;
}

}  // namespace fastlayers

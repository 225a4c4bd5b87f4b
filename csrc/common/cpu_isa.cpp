#include "common/cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fastlayers {
namespace {

bool cpu_supports(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  switch (isa) {
    case CpuIsa::kBase: return true;
    case CpuIsa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    case CpuIsa::kAvx512:
      return cpu_supports(CpuIsa::kAvx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512dq");
  }
  return false;
#else
  return isa == CpuIsa::kBase;
#endif
}

bool compiled(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBase: return true;
#if defined(FL_HAVE_CPU_avx2)
    case CpuIsa::kAvx2: return true;
#endif
#if defined(FL_HAVE_CPU_avx512)
    case CpuIsa::kAvx512: return true;
#endif
    default: return false;
  }
}

CpuIsa parse_isa(const std::string& name) {
  if (name == "base") return CpuIsa::kBase;
  if (name == "avx2") return CpuIsa::kAvx2;
  if (name == "avx512") return CpuIsa::kAvx512;
  throw std::invalid_argument("unknown CPU ISA '" + name + "'; expected base, avx2 or avx512");
}

CpuIsa best_available() {
  auto isas = available_cpu_isas();
  return isas.back();
}

CpuIsa initial_isa() {
  CpuIsa best = best_available();
  if (const char* env = std::getenv("FASTLAYERS_CPU_ISA"); env && *env) {
    try {
      CpuIsa wanted = parse_isa(env);
      if (static_cast<int>(wanted) < static_cast<int>(best)) return wanted;
    } catch (const std::invalid_argument&) {
      // An unusable environment value must not make the import fail; keep the best ISA.
    }
  }
  return best;
}

std::atomic<int>& active_isa_storage() {
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kBase: return "base";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
  }
  return "?";
}

std::vector<CpuIsa> available_cpu_isas() {
  std::vector<CpuIsa> isas;
  for (CpuIsa isa : {CpuIsa::kBase, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (compiled(isa) && cpu_supports(isa)) isas.push_back(isa);
  }
  return isas;
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(active_isa_storage().load(std::memory_order_relaxed)); }

void set_cpu_isa(const std::string& name) {
  CpuIsa wanted = parse_isa(name);
  if (!compiled(wanted) || !cpu_supports(wanted)) {
    throw std::invalid_argument(std::string("CPU ISA '") + name +
                                "' is not available: it was not compiled in or this CPU lacks it");
  }
  active_isa_storage().store(static_cast<int>(wanted), std::memory_order_relaxed);
}

}  // namespace fastlayers

// Runtime choice among the CPU ISAs the kernel files were compiled for.
//
// Each kernel file is compiled once per ISA (csrc/cmake/FastlayersCpuKernels.cmake) into
// namespace fastlayers::cpu_<isa> and exposes a table of function pointers. The ops
// call `select_cpu_kernels(table_base, table_avx2, table_avx512)` and get the widest
// one this CPU runs. `set_cpu_isa` caps the choice, so tests can exercise every path
// on one machine; FASTLAYERS_CPU_ISA=base|avx2|avx512 does the same from the
// environment at start-up.
#pragma once

#include <string>
#include <vector>

namespace fastlayers {

enum class CpuIsa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// The ISAs both compiled into this build and supported by the running CPU.
std::vector<CpuIsa> available_cpu_isas();
// The ISA the ops dispatch to now.
CpuIsa active_cpu_isa();
// Cap dispatch at `name`; throws std::invalid_argument for an unknown or unavailable ISA.
void set_cpu_isa(const std::string& name);

template <class Table>
const Table& select_cpu_kernels(const Table& base, const Table& avx2, const Table& avx512) {
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512: return avx512;
    case CpuIsa::kAvx2: return avx2;
    case CpuIsa::kBase: break;
  }
  return base;
}

}  // namespace fastlayers

// Declares `extern const Table name;` in every ISA namespace and defines
// `const Table& name_select()` returning the active one. Builds without the x86
// ISAs (other architectures) map every ISA to the base table.
#if defined(FL_HAVE_CPU_avx512) && defined(FL_HAVE_CPU_avx2)
#define FL_DECLARE_CPU_KERNEL_TABLE(Table, name)                                  \
  namespace fastlayers::cpu_base { extern const Table name; }                     \
  namespace fastlayers::cpu_avx2 { extern const Table name; }                     \
  namespace fastlayers::cpu_avx512 { extern const Table name; }                   \
  namespace fastlayers {                                                          \
  inline const Table& name##_select() {                                           \
    return select_cpu_kernels(cpu_base::name, cpu_avx2::name, cpu_avx512::name);  \
  }                                                                               \
  }
#else
#define FL_DECLARE_CPU_KERNEL_TABLE(Table, name)                                  \
  namespace fastlayers::cpu_base { extern const Table name; }                     \
  namespace fastlayers {                                                          \
  inline const Table& name##_select() { return cpu_base::name; }                  \
  }
#endif

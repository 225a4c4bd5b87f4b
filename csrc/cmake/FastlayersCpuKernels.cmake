# fastlayers_add_cpu_kernels(<name> <files...>)
#
# Kernel files hold no torch headers, so compiling them several times is cheap. Each
# file is compiled once per CPU ISA into namespace fastlayers::cpu_<isa>; the ops pick
# the widest ISA the running CPU supports (csrc/common/cpu_isa.h). One binary then
# runs fast on AVX-512 machines and correctly on any x86-64 (or other) CPU.
#
# Sets FASTLAYERS_CPU_ISA_STRING (the ISAs compiled, comma-separated).
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set(FASTLAYERS_CPU_ISAS base avx2 avx512)
else()
  set(FASTLAYERS_CPU_ISAS base)
endif()
set(FASTLAYERS_ISA_FLAGS_base "")
set(FASTLAYERS_ISA_FLAGS_avx2 -mavx2 -mfma -mf16c)
set(FASTLAYERS_ISA_FLAGS_avx512 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx2 -mfma -mf16c
    -mprefer-vector-width=512)

function(fastlayers_add_cpu_kernels name)
  set(targets "")
  foreach(isa IN LISTS FASTLAYERS_CPU_ISAS)
    set(tgt ${name}_${isa})
    add_library(${tgt} OBJECT ${ARGN})
    target_include_directories(${tgt} PRIVATE "${PROJECT_SOURCE_DIR}/csrc")
    # -fno-math-errno and -fno-trapping-math let sqrt, rounding and friends vectorize;
    # -ffp-contract=fast fuses a * b + c into FMAs (ISO -std modes turn it off); -fopenmp-simd honours
    # `#pragma omp simd` without linking an OpenMP runtime (torch brings its own).
    target_compile_options(${tgt} PRIVATE ${FASTLAYERS_ISA_FLAGS_${isa}}
      -O3 -fno-math-errno -fno-trapping-math -ffp-contract=fast -fopenmp-simd -Wall -Wextra)
    target_compile_definitions(${tgt} PRIVATE FL_CPU_NS=cpu_${isa} FL_CPU_ISA_${isa}=1)
    list(APPEND targets ${tgt})
  endforeach()
  add_library(${name} INTERFACE)
  foreach(tgt IN LISTS targets)
    target_sources(${name} INTERFACE $<TARGET_OBJECTS:${tgt}>)
  endforeach()
  string(REPLACE ";" "," isas "${FASTLAYERS_CPU_ISAS}")
  foreach(isa IN LISTS FASTLAYERS_CPU_ISAS)
    target_compile_definitions(${name} INTERFACE FL_HAVE_CPU_${isa}=1)
  endforeach()
  set(FASTLAYERS_CPU_ISA_STRING "${isas}" PARENT_SCOPE)
endfunction()

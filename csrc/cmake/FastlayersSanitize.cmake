# FASTLAYERS_SANITIZE: a ;- or ,-separated list of sanitizers (e.g. "address;undefined")
# for the CPU kernel files and the op files. Empty (the default) builds without.
#
# Read before FastlayersTorch: a sanitized build is a CPU-only build (nvcc and the CUDA
# glue are not instrumented, and the sanitizer run has no GPU), so FASTLAYERS_CUDA is
# forced off. torch itself is not instrumented: the extension is loaded into a Python
# whose ASan runtime comes first through LD_PRELOAD (tests/run_sanitized.sh).
#
# fastlayers_sanitize(<targets...>) adds the flags to the targets:
#  -fno-sanitize-recover=all  an UBSan report aborts the process (a failing test run)
#                             instead of printing and continuing;
#  -fno-omit-frame-pointer -g readable stack traces in the reports.
set(FASTLAYERS_SANITIZE "" CACHE STRING "Sanitizers for the CPU kernels and ops, e.g. address;undefined (empty: none)")
string(REPLACE "," ";" FASTLAYERS_SANITIZE_LIST "${FASTLAYERS_SANITIZE}")
list(REMOVE_ITEM FASTLAYERS_SANITIZE_LIST "")
if(FASTLAYERS_SANITIZE_LIST)
  if(NOT FASTLAYERS_CUDA STREQUAL "off")
    message(STATUS "fastlayers: FASTLAYERS_SANITIZE=${FASTLAYERS_SANITIZE}: CUDA kernels are not built")
  endif()
  set(FASTLAYERS_CUDA "off")
  string(REPLACE ";" "," _fl_sanitizers "${FASTLAYERS_SANITIZE_LIST}")
  set(FASTLAYERS_SANITIZE_FLAGS -fsanitize=${_fl_sanitizers} -fno-sanitize-recover=all -fno-omit-frame-pointer -g)
  message(STATUS "fastlayers: sanitizers ${_fl_sanitizers}")
endif()

function(fastlayers_sanitize)
  if(NOT FASTLAYERS_SANITIZE_LIST)
    return()
  endif()
  foreach(tgt IN LISTS ARGN)
    target_compile_options(${tgt} PRIVATE ${FASTLAYERS_SANITIZE_FLAGS})
    get_target_property(_type ${tgt} TYPE)
    if(NOT _type STREQUAL "OBJECT_LIBRARY")
      target_link_options(${tgt} PRIVATE ${FASTLAYERS_SANITIZE_FLAGS})
    endif()
  endforeach()
endfunction()

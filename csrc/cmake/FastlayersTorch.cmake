# Finds the installed torch and decides whether CUDA kernels are built.
#
# Sets: FASTLAYERS_TORCH_VERSION, FASTLAYERS_WITH_CUDA, FASTLAYERS_CUDA_ARCH_LIST,
#       FASTLAYERS_CUDA_EXTRA_INCLUDES, TORCH_LIBRARIES (from find_package(Torch)).
#
# Everything is discovered from the Python interpreter that runs the build, so a user
# types no flags. CUDA-specific quirks handled here:
#  - the system toolkit may lack the cuBLAS headers and libnvrtc; torch's pip
#    dependencies (site-packages/nvidia/cu13 or nvidia/<component>) carry them;
#  - those pip libraries have only versioned names (libcublas.so.13), which
#    find_library does not match, so their paths are handed to CMake directly;
#  - torch's CMake config (FindCUDA) needs CUDA_TOOLKIT_ROOT_DIR.

execute_process(
  COMMAND "${Python_EXECUTABLE}" -c [=[
import glob, os, sys
import torch, torch.utils
print(torch.__version__.split("+")[0])
print(torch.version.cuda or "")
print(torch.utils.cmake_prefix_path)
roots = []
for entry in sys.path:
    base = os.path.join(entry, "nvidia")
    if os.path.isdir(base):
        roots += sorted(glob.glob(os.path.join(base, "*")))
print(";".join(r for r in roots if os.path.isdir(r)))
]=]
  OUTPUT_VARIABLE _torch_info
  RESULT_VARIABLE _torch_rc
  ERROR_VARIABLE _torch_err
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _torch_rc EQUAL 0)
  message(FATAL_ERROR
    "fastlayers builds against the installed torch, but `import torch` failed in "
    "${Python_EXECUTABLE}:\n${_torch_err}\nInstall torch first, then build with "
    "`pip install --no-build-isolation .`")
endif()
string(REPLACE "\n" ";" _torch_info "${_torch_info}")
list(GET _torch_info 0 FASTLAYERS_TORCH_VERSION)
list(GET _torch_info 1 _torch_cuda_version)
list(GET _torch_info 2 _torch_prefix)
list(LENGTH _torch_info _n)
set(_nvidia_roots "")
if(_n GREATER 3)
  list(SUBLIST _torch_info 3 -1 _nvidia_roots)
endif()
message(STATUS "fastlayers: torch ${FASTLAYERS_TORCH_VERSION}, CUDA build: '${_torch_cuda_version}'")
list(APPEND CMAKE_PREFIX_PATH "${_torch_prefix}")

# ---- decide on CUDA -------------------------------------------------------------
set(FASTLAYERS_WITH_CUDA OFF)
set(_cuda_reason "")
set(_cuda_root "")
if(_torch_cuda_version STREQUAL "")
  set(_cuda_reason "the installed torch is a CPU-only build")
else()
  # nvcc: CMAKE_CUDA_COMPILER, $CUDACXX, $CUDA_HOME, $CUDA_PATH, the standard location, PATH.
  set(_nvcc "")
  if(CMAKE_CUDA_COMPILER)
    set(_nvcc "${CMAKE_CUDA_COMPILER}")
  elseif(DEFINED ENV{CUDACXX})
    set(_nvcc "$ENV{CUDACXX}")
  else()
    foreach(_root "$ENV{CUDA_HOME}" "$ENV{CUDA_PATH}" /usr/local/cuda)
      if(_root AND EXISTS "${_root}/bin/nvcc")
        set(_nvcc "${_root}/bin/nvcc")
        break()
      endif()
    endforeach()
    if(NOT _nvcc)
      find_program(_nvcc_on_path nvcc)
      if(_nvcc_on_path)
        set(_nvcc "${_nvcc_on_path}")
      endif()
    endif()
  endif()
  if(NOT _nvcc)
    set(_cuda_reason "nvcc was not found (set CUDA_HOME or CUDACXX)")
  else()
    # Resolve wrappers and links (e.g. /usr/local/bin/nvcc) to the real toolkit tree.
    execute_process(COMMAND "${_nvcc}" --dryrun -E -x cu /dev/null
      ERROR_VARIABLE _nvcc_dry OUTPUT_QUIET RESULT_VARIABLE _nvcc_rc)
    if(_nvcc_dry MATCHES "#\\$ TOP=([^\n]+)")
      file(REAL_PATH "${CMAKE_MATCH_1}" _cuda_root)
    else()
      file(REAL_PATH "${_nvcc}" _nvcc_real)
      get_filename_component(_cuda_root "${_nvcc_real}/../.." ABSOLUTE)
    endif()
    if(NOT EXISTS "${_cuda_root}/bin/nvcc")
      set(_cuda_reason "could not locate the CUDA toolkit of ${_nvcc}")
      set(_cuda_root "")
    elseif(FASTLAYERS_CUDA STREQUAL "off")
      set(_cuda_reason "FASTLAYERS_CUDA=off")
    else()
      set(FASTLAYERS_WITH_CUDA ON)
    endif()
  endif()
endif()

if(NOT FASTLAYERS_WITH_CUDA)
  if(FASTLAYERS_CUDA STREQUAL "on")
    message(FATAL_ERROR "FASTLAYERS_CUDA=on but CUDA kernels cannot be built: ${_cuda_reason}")
  endif()
  message(STATUS "fastlayers: CUDA kernels not built (${_cuda_reason}); CPU kernels only")
endif()
# A CUDA build of torch looks for the toolkit in its CMake config even when no CUDA
# kernel is built; point it at the toolkit found above and fill in what that lacks.
if(_cuda_root)
  set(CUDA_TOOLKIT_ROOT_DIR "${_cuda_root}" CACHE PATH "CUDA toolkit used by fastlayers")
  set(CUDAToolkit_ROOT "${_cuda_root}")
  set(CMAKE_CUDA_COMPILER "${_cuda_root}/bin/nvcc" CACHE FILEPATH "")
  message(STATUS "fastlayers: CUDA toolkit at ${_cuda_root}")

  # Headers and libraries the toolkit lacks, taken from torch's pip dependencies.
  set(FASTLAYERS_CUDA_EXTRA_INCLUDES "")
  foreach(_header cublas_v2.h cusparse.h cusolverDn.h curand.h cufft.h nvrtc.h)
    if(NOT EXISTS "${_cuda_root}/include/${_header}")
      foreach(_root IN LISTS _nvidia_roots)
        if(EXISTS "${_root}/include/${_header}")
          list(APPEND FASTLAYERS_CUDA_EXTRA_INCLUDES "${_root}/include")
          break()
        endif()
      endforeach()
    endif()
  endforeach()
  list(REMOVE_DUPLICATES FASTLAYERS_CUDA_EXTRA_INCLUDES)
  foreach(_lib cublas cublasLt nvrtc curand cufft cusparse cusolver nvJitLink cupti nvToolsExt)
    if(NOT EXISTS "${_cuda_root}/lib64/lib${_lib}.so" AND NOT EXISTS "${_cuda_root}/lib/lib${_lib}.so"
       AND NOT CUDA_${_lib}_LIBRARY)
      foreach(_root IN LISTS _nvidia_roots)
        file(GLOB _found "${_root}/lib/lib${_lib}.so.[0-9]*")
        if(_found)
          list(SORT _found)
          list(GET _found 0 _found)
          set(CUDA_${_lib}_LIBRARY "${_found}" CACHE FILEPATH "")
          break()
        endif()
      endforeach()
    endif()
  endforeach()
endif()

# Architectures: sm_80 and sm_90 (+PTX for newer chips) unless the user says otherwise.
# Set even when no CUDA kernel is built: without it torch's config compiles and runs a
# GPU-detection program, which fails in a build folder configured earlier with CUDA
# (FASTLAYERS_CUDA=off after a CUDA build: "CUDA_ARCHITECTURES is empty").
if(_cuda_root AND (NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST} OR "$ENV{TORCH_CUDA_ARCH_LIST}" STREQUAL ""))
  set(ENV{TORCH_CUDA_ARCH_LIST} "8.0;9.0+PTX")
endif()
if(FASTLAYERS_WITH_CUDA)
  set(FASTLAYERS_CUDA_ARCH_LIST "$ENV{TORCH_CUDA_ARCH_LIST}")
  message(STATUS "fastlayers: CUDA architectures ${FASTLAYERS_CUDA_ARCH_LIST}")
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 20)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  # torch's config takes the architectures from TORCH_CUDA_ARCH_LIST (as -gencode
  # flags) and warns if CMake's own variable is set, which enable_language() does.
  unset(CMAKE_CUDA_ARCHITECTURES)
  unset(CMAKE_CUDA_ARCHITECTURES CACHE)
endif()

find_package(Torch REQUIRED CONFIG)
# TORCH_CXX_FLAGS carries the libstdc++ ABI define; every C++ file must agree on it.
string(APPEND CMAKE_CXX_FLAGS " ${TORCH_CXX_FLAGS}")
if(FASTLAYERS_WITH_CUDA)
  list(APPEND FASTLAYERS_CUDA_EXTRA_INCLUDES ${CUDAToolkit_INCLUDE_DIRS})
endif()

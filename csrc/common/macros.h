// Portability macros shared by CPU (g++) and CUDA (nvcc) translation units.
#pragma once

#if defined(__CUDACC__)
#define FL_HOST_DEVICE __host__ __device__
#define FL_INLINE __forceinline__
#else
#define FL_HOST_DEVICE
#define FL_INLINE inline __attribute__((always_inline))
#endif

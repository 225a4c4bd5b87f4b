// conv2d CUDA kernels: one shared-memory tiled implicit GEMM (conv2d_kernel.h) for the
// forward, grad-input (run as a forward), grad-weight (split over pixel chunks,
// atomically accumulated) and the fused 2x2 max-pool epilogue. Includes no torch
// headers; the glue in conv2d_cuda.cpp allocates and passes the current stream.
//
// grad-weight under torch.use_deterministic_algorithms(True) runs unsplit (each C
// element gets one atomicAdd onto 0), which makes it deterministic.
//
// A block computes a kTileRows x kTileColumns tile of C with 256 threads, each 4 rows x
// 4 columns (columns strided by 16 so that stores are coalesced along the channels);
// per kTileDepth step the block stages A (gathered through the decoded offsets) and B
// in shared memory. The four rows of a thread are one pooling window in kWindows mode,
// so the pool runs in registers and the pre-pool activation is never written.
#include <cuda_runtime.h>

#include <algorithm>

#include "bias_act/bias_act_math.h"
#include "common/cuda_scalar.cuh"
#include "conv2d/conv2d_kernel.h"

namespace fastlayers::conv2d {
namespace {

constexpr int kTileRows = 64;
constexpr int kTileColumns = 64;
constexpr int kTileDepth = 16;
constexpr int kThreads = 256;

template <class S> using Acc = cuda::Compute<S>;
using cuda::from_compute;
using cuda::to_compute;

// Offset of output pixel `pixel` (n, oh, ow)'s receptive-field corner in the image.
__device__ __forceinline__ int64_t pixel_offset(const CudaGemmArgs& a, int64_t pixel) {
  const int64_t plane = a.out_h * a.out_w;
  const int64_t n = pixel / plane, rem = pixel % plane;
  const int64_t oh = rem / a.out_w, ow = rem % a.out_w;
  return ((n * a.image_rows + oh * a.stride_h) * a.image_cols + ow * a.stride_w) * a.image_channels;
}

// Row 4w + q is pixel (2 ph + q / 2, 2 pw + q % 2) of window w = (n, ph, pw).
__device__ __forceinline__ int64_t window_pixel_offset(const CudaGemmArgs& a, int64_t row) {
  const int64_t pooled_h = a.out_h / 2, pooled_w = a.out_w / 2;
  const int64_t w = row / 4, q = row % 4;
  const int64_t n = w / (pooled_h * pooled_w), rem = w % (pooled_h * pooled_w);
  const int64_t oh = 2 * (rem / pooled_w) + q / 2, ow = 2 * (rem % pooled_w) + q % 2;
  return ((n * a.image_rows + oh * a.stride_h) * a.image_cols + ow * a.stride_w) * a.image_channels;
}

// Offset of (kh, kw, ci) inside a receptive field.
__device__ __forceinline__ int64_t field_offset(const CudaGemmArgs& a, int64_t t) {
  const int64_t per_kh = a.kernel_w * a.depth_channels;
  const int64_t kh = t / per_kh, rem = t % per_kh;
  const int64_t kw = rem / a.depth_channels, ci = rem % a.depth_channels;
  return (kh * a.dilation_h * a.image_cols + kw * a.dilation_w) * a.image_channels + ci;
}

template <class S, CudaGemmMode M>
__global__ void __launch_bounds__(kThreads) offset_gemm_kernel(CudaGemmArgs a, int64_t rows, int64_t depth,
                                                               int64_t depth_per_split) {
  using T = typename Acc<S>::type;
  __shared__ T a_tile[kTileDepth][kTileRows + 1];  // +1: the staging stores hit distinct banks
  __shared__ T b_tile[kTileDepth][kTileColumns];
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t row0 = int64_t(blockIdx.x) * kTileRows;
  const int64_t col0 = int64_t(blockIdx.y) * kTileColumns;
  const int64_t group = blockIdx.z % a.groups, split = blockIdx.z / a.groups;
  const int64_t depth_begin = split * depth_per_split;
  const int64_t depth_end = min(depth, depth_begin + depth_per_split);
  const S* image = static_cast<const S*>(a.image) + group * a.depth_channels;
  const S* b = static_cast<const S*>(a.b) + group * a.b_group_stride;

  // The A element a thread stages: rows m_load .. m_load + 3 of depth k_load. A row's
  // offset is decoded once per tile.
  const int k_load = threadIdx.x % kTileDepth;
  const int m_load = (threadIdx.x / kTileDepth) * 4;
  int64_t row_off[4];
  bool row_ok[4];
  for (int i = 0; i < 4; ++i) {
    const int64_t r = row0 + m_load + i;
    row_ok[i] = r < rows;
    row_off[i] = 0;
    if (row_ok[i]) {
      row_off[i] = M == CudaGemmMode::kWeightGrad ? field_offset(a, r)
                   : M == CudaGemmMode::kWindows  ? window_pixel_offset(a, r)
                                                  : pixel_offset(a, r);
    }
  }

  T acc[4][4] = {};
  for (int64_t d0 = depth_begin; d0 < depth_end; d0 += kTileDepth) {
    {
      const int64_t t = d0 + k_load;
      const bool t_ok = t < depth_end;
      const int64_t t_off = !t_ok ? 0 : M == CudaGemmMode::kWeightGrad ? pixel_offset(a, t) : field_offset(a, t);
      for (int i = 0; i < 4; ++i) {
        a_tile[k_load][m_load + i] = row_ok[i] && t_ok ? to_compute(image[row_off[i] + t_off]) : T(0);
      }
    }
    for (int e = threadIdx.x; e < kTileDepth * kTileColumns; e += kThreads) {
      const int k = e / kTileColumns, n = e % kTileColumns;
      const int64_t t = d0 + k, col = col0 + n;
      b_tile[k][n] = t < depth_end && col < a.columns ? to_compute(b[t * a.ldb + col]) : T(0);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileDepth; ++k) {
      T av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = a_tile[k][ty * 4 + i];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = b_tile[k][tx + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
    __syncthreads();
  }

  const S* bias = static_cast<const S*>(a.bias);
  const int64_t all_columns = a.groups * a.columns;
  for (int j = 0; j < 4; ++j) {
    const int64_t col = col0 + tx + 16 * j;
    if (col >= a.columns) continue;
    if constexpr (M == CudaGemmMode::kWeightGrad) {
      T* c = static_cast<T*>(a.c) + group * a.c_group_stride;
      for (int i = 0; i < 4; ++i) {
        const int64_t r = row0 + ty * 4 + i;
        if (r < rows) atomicAdd(c + r * a.ldc + col, acc[i][j]);
      }
    } else {
      const T b_value = bias ? to_compute(bias[group * a.columns + col]) : T(0);
      T v[4];
      for (int i = 0; i < 4; ++i) {
        v[i] = acc[i][j] + b_value;
        if (a.relu) v[i] = bias_act::activation_forward<bias_act::Activation::kRelu, T>(v[i]);
      }
      if constexpr (M == CudaGemmMode::kForward) {
        S* c = static_cast<S*>(a.c) + group * a.c_group_stride;
        for (int i = 0; i < 4; ++i) {
          const int64_t r = row0 + ty * 4 + i;
          if (r < rows) c[r * a.ldc + col] = from_compute<S>(v[i]);
        }
      } else {  // kWindows: rows ty*4 .. ty*4+3 are one window, pooled in scan order
        const int64_t window = (row0 + ty * 4) / 4;
        if (row0 + ty * 4 < rows) {
          T m = v[0];
          uint8_t at = 0;
          for (int q = 1; q < 4; ++q) {
            if (v[q] > m || v[q] != v[q]) {  // torch's max_pool2d rule: NaN wins
              m = v[q];
              at = uint8_t(q);
            }
          }
          const int64_t out = window * all_columns + group * a.columns + col;
          static_cast<S*>(a.pooled)[out] = from_compute<S>(m);
          a.argmax[out] = at;
        }
      }
    }
  }
}

template <class S>
int launch_typed(const CudaGemmArgs& a, cudaStream_t stream) {
  const int64_t pixels = a.batch * a.out_h * a.out_w;
  const int64_t field = a.kernel_h * a.kernel_w * a.depth_channels;
  int64_t rows = pixels, depth = field;
  if (a.mode == CudaGemmMode::kWindows) rows = 4 * a.batch * (a.out_h / 2) * (a.out_w / 2);
  if (a.mode == CudaGemmMode::kWeightGrad) {
    rows = field;
    depth = pixels;
  }
  if (rows == 0 || a.columns == 0) return cudaSuccess;
  const int64_t row_tiles = (rows + kTileRows - 1) / kTileRows;
  const int64_t column_tiles = (a.columns + kTileColumns - 1) / kTileColumns;
  int64_t splits = 1;
  if (a.mode == CudaGemmMode::kWeightGrad && !a.single_split) {
    // Enough blocks to fill a large GPU, each reducing at least 256 pixels; the split
    // blocks of one C element add their sums atomically, in no fixed order.
    const int64_t blocks = row_tiles * column_tiles * a.groups;
    splits = std::max<int64_t>(1, std::min<int64_t>((depth + 255) / 256, (1024 + blocks - 1) / blocks));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535 / a.groups));
  }
  if (row_tiles > 0x7fffffff || column_tiles > 65535 || a.groups * splits > 65535) {
    return int(cudaErrorInvalidConfiguration);  // the glue's checks keep shapes below these limits
  }
  const int64_t per_split = std::max<int64_t>(1, (depth + splits - 1) / splits);
  const dim3 grid(unsigned(row_tiles), unsigned(column_tiles), unsigned(a.groups * splits));
  switch (a.mode) {
    case CudaGemmMode::kForward:
      offset_gemm_kernel<S, CudaGemmMode::kForward><<<grid, kThreads, 0, stream>>>(a, rows, depth, per_split);
      break;
    case CudaGemmMode::kWindows:
      offset_gemm_kernel<S, CudaGemmMode::kWindows><<<grid, kThreads, 0, stream>>>(a, rows, depth, per_split);
      break;
    case CudaGemmMode::kWeightGrad:
      offset_gemm_kernel<S, CudaGemmMode::kWeightGrad><<<grid, kThreads, 0, stream>>>(a, rows, depth, per_split);
      break;
  }
  return int(cudaGetLastError());
}

// edge_grad_input_sum's reads: grad_output(co, oh, ow) of one image at any strides, and
// the dense [C_out, C_in/G, kh, kw] weight, both in the accumulation type.
template <class S> struct StridedGradOutput {
  const S* image;
  const int64_t* strides;
  __device__ typename Acc<S>::type operator()(int64_t co, int64_t oh, int64_t ow) const {
    return to_compute(image[co * strides[1] + oh * strides[2] + ow * strides[3]]);
  }
};
template <class S> struct DenseWeight {
  const S* weight;
  const EdgeGeometry& e;
  __device__ typename Acc<S>::type operator()(int64_t co, int64_t cl, int64_t kh, int64_t kw) const {
    return to_compute(weight[((co * e.in_per_group + cl) * e.kernel_h + kh) * e.kernel_w + kw]);
  }
};

// One thread per (n, edge pixel, ci): EdgeGeometry's exact sum, only when the weight
// holds a NaN or an infinity (the flag, computed on the device, keeps the host from
// synchronizing; with a finite weight every thread returns at once).
template <class S>
__global__ void edge_grad_input_kernel(EdgeGradInputCudaArgs a) {
  if (*a.weight_finite) return;
  const EdgeGeometry& e = a.geometry;
  const int64_t total = a.batch * e.pixels() * e.in_channels;
  const S* go = static_cast<const S*>(a.grad_output);
  const S* w = static_cast<const S*>(a.weight);
  S* out = static_cast<S*>(a.grad_input);
  const int64_t* gs = a.grad_output_strides;
  for (int64_t index = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; index < total;
       index += int64_t(gridDim.x) * blockDim.x) {
    const int64_t ci = index % e.in_channels, rest = index / e.in_channels;
    const int64_t n = rest / e.pixels();
    int64_t ih = 0, iw = 0;
    e.pixel(rest % e.pixels(), ih, iw);
    const StridedGradOutput<S> grad_output_at{go + n * gs[0], gs};
    const DenseWeight<S> weight_at{w, e};
    const auto sum = edge_grad_input_sum<typename Acc<S>::type>(e, ih, iw, ci, grad_output_at, weight_at);
    out[((n * e.height + ih) * e.width + iw) * e.in_channels + ci] = from_compute<S>(sum);
  }
}

template <class S>
int launch_edge_typed(const EdgeGradInputCudaArgs& a, cudaStream_t stream) {
  const int64_t total = a.batch * a.geometry.pixels() * a.geometry.in_channels;
  if (total == 0) return cudaSuccess;
  constexpr int kEdgeThreads = 256;
  const int64_t blocks = std::min<int64_t>((total + kEdgeThreads - 1) / kEdgeThreads, 65535);
  edge_grad_input_kernel<S><<<unsigned(blocks), kEdgeThreads, 0, stream>>>(a);
  return int(cudaGetLastError());
}

}  // namespace

int launch_offset_gemm_cuda(const CudaGemmArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int status = int(cudaErrorInvalidValue);
  cuda::dispatch_dtype(args.dtype, [&](auto storage) { status = launch_typed<decltype(storage)>(args, stream); });
  return status;
}

int launch_edge_grad_input_cuda(const EdgeGradInputCudaArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int status = int(cudaErrorInvalidValue);
  cuda::dispatch_dtype(args.dtype, [&](auto storage) { status = launch_edge_typed<decltype(storage)>(args, stream); });
  return status;
}

}  // namespace fastlayers::conv2d

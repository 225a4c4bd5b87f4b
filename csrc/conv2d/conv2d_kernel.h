// Torch-free interface between the conv2d ops (conv2d.cpp) and their CPU kernels
// (conv2d_cpu_kernel.cpp, compiled once per ISA).
//
// Every convolution pass is one "offset GEMM" (an implicit GEMM whose A operand is
// addressed through two offset tables instead of being materialized by im2col):
//
//   C[r][c] (+)= sum_t A[row_offsets[r] + depth_offsets[t]] * B[t * ldb + c]
//
// with A a zero-padded NHWC image. The forward takes rows = output pixels (offset of
// the pixel's receptive-field corner), depth = (kh, kw, ci) (offset inside the field)
// and B = the weight packed as [kh][kw][ci][co]. grad-input is the same forward run
// on the zero-padded (and, for stride > 1, zero-dilated) grad_output with the weight
// flipped and transposed. grad-weight swaps the tables: rows = (kh, kw, ci), depth =
// output pixels, B = grad_output as [pixel][co]. One register-tiled micro-kernel thus
// serves all three passes, and the fused max-pool only reorders the rows.
#pragma once

#include <cstdint>

#include "common/cpu_isa.h"
#include "common/macros.h"
#include "common/dtype.h"

namespace fastlayers::conv2d {

// B and C columns are padded to a multiple of kColumnPad elements (a whole vector
// at every ISA's width for float and double), zero-filled in B.
constexpr int64_t kColumnPad = 16;

struct OffsetGemmArgs {
  const void* a = nullptr;               // the padded image, element type = dtype
  const int64_t* row_offsets = nullptr;  // [rows]
  const int64_t* depth_offsets = nullptr;  // [depth]
  int64_t depth = 0;
  const void* b = nullptr;  // [depth][ldb], columns >= `columns` zero
  int64_t ldb = 0;          // multiple of kColumnPad
  void* c = nullptr;        // row r at c + r * ldc; only the first `columns` are written
  int64_t ldc = 0;
  int64_t columns = 0;
  const void* bias = nullptr;  // [ldb] (zero-padded) added to C, or null
  bool relu = false;           // C = max(C, 0) after the bias (NaN kept, as torch.relu)
  DType dtype = DType::kFloat32;  // float32 or float64
};

// Arguments of the 2x2 / stride-2 max-pool epilogue: `conv` holds groups of four
// consecutive rows (the window's pixels in scan order (0,0), (0,1), (1,0), (1,1)),
// `columns` values each at stride ldc; window w's maximum goes to pooled[w * columns]
// and its position (0..3, the first maximum; NaN wins, as torch's max_pool2d) to
// argmax[w * columns].
struct PoolArgs {
  const void* conv = nullptr;
  int64_t ldc = 0;
  int64_t columns = 0;
  void* pooled = nullptr;
  uint8_t* argmax = nullptr;
  DType dtype = DType::kFloat32;
};

// An [N, C, H, W] tensor (any strides) placed into a dense [N, rows, cols, channels]
// (NHWC) image: element (i, j) at (top + i * step_h, left + j * step_w), everything
// else zero (borders, the gaps of step > 1, channels >= C). One pass, no separate fill.
struct PlaceArgs {
  const void* src = nullptr;
  int64_t src_stride[4] = {0, 0, 0, 0};  // elements, in N, C, H, W order
  int64_t channels = 0, height = 0, width = 0;
  void* dst = nullptr;
  int64_t rows = 0, cols = 0, dst_channels = 0;
  int64_t top = 0, left = 0, step_h = 1, step_w = 1;
  DType dtype = DType::kFloat32;
};

// Rows [row_begin, row_end) of an [rows][ldc] block, the consecutive pixels
// first_pixel + r of an [N, columns, plane] (NCHW) tensor, written channel by channel.
struct StoreNchwArgs {
  const void* block = nullptr;
  int64_t ldc = 0;
  int64_t columns = 0;
  int64_t first_pixel = 0;
  int64_t plane = 0;  // H * W of the destination
  void* dst = nullptr;
  DType dtype = DType::kFloat32;
};

// Depthwise convolution (one input and one output channel a group): per output pixel,
// channels are independent, so the kernel vectorizes along the (contiguous NHWC)
// channels instead of running the GEMM with one useful lane a vector.
// C[r][ch] = bias[ch] + sum_k image[row_offsets[r] + tap_offsets[k] + ch] * weight[k][ch]
struct DepthwiseArgs {
  const void* image = nullptr;
  const int64_t* row_offsets = nullptr;
  const int64_t* tap_offsets = nullptr;  // [taps]: (kh, kw) inside the receptive field
  int64_t taps = 0;
  const void* weight = nullptr;  // [taps][channels]
  const void* bias = nullptr;    // [channels] or null
  bool relu = false;
  void* c = nullptr;  // row r at c + r * ldc
  int64_t ldc = 0;
  int64_t channels = 0;
  DType dtype = DType::kFloat32;
};

// Depthwise grad-weight over a chunk of output pixels, vectorized along the channels:
// out[k][ch] = sum_p image[pixel_offsets[p] + tap_offsets[k] + ch] * grad[p * channels + ch]
struct DepthwiseWeightGradArgs {
  const void* image = nullptr;
  const int64_t* pixel_offsets = nullptr;  // the chunk's first pixel
  int64_t pixels = 0;
  const int64_t* tap_offsets = nullptr;
  int64_t taps = 0;
  const void* grad = nullptr;  // [pixels][channels], the chunk's first pixel
  void* out = nullptr;         // [taps][channels]
  int64_t channels = 0;
  DType dtype = DType::kFloat32;
};

struct CpuKernels {
  // Rows [row_begin, row_end) of C, every column; the caller parallelizes over rows.
  void (*offset_gemm)(const OffsetGemmArgs& args, int64_t row_begin, int64_t row_end);
  // Windows [window_begin, window_end).
  void (*max_pool_2x2)(const PoolArgs& args, int64_t window_begin, int64_t window_end);
  // Destination rows [row_begin, row_end) of the N * rows image rows.
  void (*place_image)(const PlaceArgs& args, int64_t row_begin, int64_t row_end);
  void (*store_nchw)(const StoreNchwArgs& args, int64_t row_begin, int64_t row_end);
  void (*depthwise)(const DepthwiseArgs& args, int64_t row_begin, int64_t row_end);
  void (*depthwise_weight_grad)(const DepthwiseWeightGradArgs& args);
};

#if defined(FASTLAYERS_WITH_CUDA) || defined(__CUDACC__)
// The CUDA implicit GEMM: the same offset GEMM, with the offsets decoded from the
// geometry in the kernel instead of tables. Storage float32/float64/float16/bfloat16,
// accumulation float (double for float64).
enum class CudaGemmMode : int {
  kForward = 0,     // rows = output pixels, depth = (kh, kw, ci); C = S, bias + ReLU epilogue
  kWindows = 1,     // rows = pixels window by window; epilogue bias + ReLU + 2x2 max-pool
  kWeightGrad = 2,  // rows = (kh, kw, ci), depth = output pixels; C (accumulator type) += atomically
};

struct CudaGemmArgs {
  CudaGemmMode mode = CudaGemmMode::kForward;
  DType dtype = DType::kFloat32;
  const void* image = nullptr;  // [batch][image_rows][image_cols][image_channels]
  int64_t image_rows = 0, image_cols = 0, image_channels = 0;
  int64_t batch = 0, out_h = 0, out_w = 0;
  int64_t stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1, kernel_h = 1, kernel_w = 1;
  int64_t depth_channels = 0;  // image channels of one group
  int64_t groups = 1;
  const void* b = nullptr;  // element (t, c) of group g at b[g * b_group_stride + t * ldb + c]
  int64_t ldb = 0, b_group_stride = 0;
  void* c = nullptr;  // element (r, c) of group g at c[g * c_group_stride + r * ldc + c]
  int64_t ldc = 0, c_group_stride = 0;
  int64_t columns = 0;         // per group
  const void* bias = nullptr;  // [groups * columns] or null
  bool relu = false;
  void* pooled = nullptr;      // kWindows: [windows][groups * columns]
  uint8_t* argmax = nullptr;   // kWindows: [windows][groups * columns]
  // kWeightGrad: one block reduces all of the depth for its C elements (no split), so
  // each element receives exactly one atomicAdd onto the zeroed C: deterministic.
  bool single_split = false;
};

// Returns a cudaError_t as int (0 = success); `stream` is a cudaStream_t.
int launch_offset_gemm_cuda(const CudaGemmArgs& args, void* stream);
#endif

}  // namespace fastlayers::conv2d

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::conv2d::CpuKernels, conv2d_cpu_kernels)

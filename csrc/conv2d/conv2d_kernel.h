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
  bool accumulate = false;     // C += the product (else C =)
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

// The fused conv -> ReLU -> 2x2 max-pool backward's scatter: the gradient at each pooled
// element (zero where the pooled output is <= 0, the ReLU) goes to the conv pixel its
// window's argmax (0..3, row-major in the window) names, every other conv pixel gets 0.
// Sources [N, C, PH, PW] with any strides; the result a dense [N, conv_h, conv_w, C]
// (NHWC) gradient, conv_h / conv_w = 2 PH / 2 PW plus an odd row / column of zeros.
struct UnpoolArgs {
  const void* grad = nullptr;
  const void* pooled = nullptr;
  const uint8_t* argmax = nullptr;
  int64_t grad_stride[4] = {0, 0, 0, 0};  // elements, in N, C, H, W order
  int64_t pooled_stride[4] = {0, 0, 0, 0};
  int64_t argmax_stride[4] = {0, 0, 0, 0};
  int64_t channels = 0, pooled_h = 0, pooled_w = 0, conv_h = 0, conv_w = 0;
  void* out = nullptr;
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

// grad-input at the input's edges, exactly. The grad-input passes read grad_output
// zero-padded (and, on CUDA, zero-dilated), so a tap that lands outside grad_output
// multiplies a zero: harmless unless that weight tap is NaN or infinite (0 * inf =
// NaN), where torch, which skips such taps, stays finite. With a non-finite weight
// the ops recompute the pixels that have such a tap (the "edge" pixels) by summing
// only the taps that land inside:
//   grad_input[n, ci, ih, iw] = sum over co of ci's group and taps (kh, kw) with
//   (ih + pad_h - kh * dilation_h) = oh * stride_h, 0 <= oh < out_h (and the same
//   for w) of grad_output[n, co, oh, ow] * weight[co, ci % in_per_group, kh, kw].
// Edge pixels: rows [0, top) and [height - bottom, height) over every column, and
// columns [0, left) and [width - right, width) of the rows between; a superset of the
// pixels with an outside tap (recomputing more is exact too).
struct EdgeGeometry {
  int64_t height = 0, width = 0, out_h = 0, out_w = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t in_channels = 0, in_per_group = 0, out_per_group = 0;
  int64_t top = 0, bottom = 0, left = 0, right = 0;  // top + bottom <= height, left + right <= width

  FL_HOST_DEVICE int64_t pixels() const {
    return (top + bottom) * width + (height - top - bottom) * (left + right);
  }
  // Edge pixel `index` (0 <= index < pixels()) as (ih, iw).
  FL_HOST_DEVICE void pixel(int64_t index, int64_t& ih, int64_t& iw) const {
    if (index < (top + bottom) * width) {
      const int64_t row = index / width;
      ih = row < top ? row : height - bottom + (row - top);
      iw = index % width;
      return;
    }
    index -= (top + bottom) * width;
    const int64_t side = left + right, col = index % side;
    ih = top + index / side;
    iw = col < left ? col : width - right + (col - left);
  }
};

// The grad_output position tap k reaches input position i from, when it lands inside
// (0 <= o < out); else false.
FL_HOST_DEVICE inline bool tap_source(int64_t i, int64_t k, int64_t stride, int64_t pad, int64_t dilation,
                                      int64_t out, int64_t& o) {
  const int64_t reach = i + pad - k * dilation;
  if (reach < 0 || reach % stride != 0) return false;
  o = reach / stride;
  return o < out;
}

// grad_input at edge pixel (ih, iw), input channel ci, of one image: the sum over the
// taps that land inside grad_output only (EdgeGeometry), reading grad_output(co, oh, ow)
// and weight(co, cl, kh, kw) through the caller's functors (CPU: tensor accessors; CUDA:
// strided loads in the accumulation type), so the CPU tests exercise the CUDA pass's sum.
template <class Acc, class GradOutput, class Weight>
FL_HOST_DEVICE Acc edge_grad_input_sum(const EdgeGeometry& e, int64_t ih, int64_t iw, int64_t ci,
                                       const GradOutput& grad_output, const Weight& weight) {
  const int64_t co_begin = ci / e.in_per_group * e.out_per_group, cl = ci % e.in_per_group;
  Acc sum = 0;
  for (int64_t kh = 0; kh < e.kernel_h; ++kh) {
    int64_t oh = 0;
    if (!tap_source(ih, kh, e.stride_h, e.pad_h, e.dilation_h, e.out_h, oh)) continue;
    for (int64_t kw = 0; kw < e.kernel_w; ++kw) {
      int64_t ow = 0;
      if (!tap_source(iw, kw, e.stride_w, e.pad_w, e.dilation_w, e.out_w, ow)) continue;
      for (int64_t co = co_begin; co < co_begin + e.out_per_group; ++co) {
        sum += grad_output(co, oh, ow) * weight(co, cl, kh, kw);
      }
    }
  }
  return sum;
}

// An ungrouped convolution pass in two steps, for a destination with few channels (the
// forward of a layer with 1-6 output channels: an image output layer; the grad-input of
// one with few input channels: an RGB stem). The offset GEMM computes, for every source
// pixel, the columns
//   forward:    cols[input pixel][(kh, kw, co)] = sum over ci of input * weight[co][ci][kh][kw]
//   grad-input: cols[output pixel][(kh, kw, ci)] = sum over co of grad_output * weight[co][ci][kh][kw]
// (taps x channels columns, where the one-pass GEMM would have the channels alone, a few
// lanes of a vector); then each destination pixel sums, in (kh, kw) order, the columns
// of the source pixels its taps pair it with: the input pixel o s - pad + k d of output
// pixel o (forward), the output pixels whose taps reach input pixel i (tap_source,
// grad-input). A fixed order, no atomics. Task n * dst_h + row writes destination row
// `row` of image n (of the images `columns` holds).
struct ColumnsToImageArgs {
  const void* columns = nullptr;  // [images][src_h][src_w][ldc]
  int64_t ldc = 0;                // >= kernel_h * kernel_w * channels
  bool forward = false;           // the pairing above
  int64_t src_h = 0, src_w = 0, dst_h = 0, dst_w = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, pad_h = 0, pad_w = 0;
  int64_t dilation_h = 1, dilation_w = 1;
  int64_t channels = 0;               // destination channels
  const void* bias = nullptr;         // [channels] added (forward), or null
  bool relu = false;                  // then max(x, 0), NaN kept (forward)
  void* out = nullptr;  // element (n, c, h, w) at out[n * s0 + c * s1 + h * s2 + w * s3]
  int64_t out_stride[4] = {0, 0, 0, 0};
  DType dtype = DType::kFloat32;  // float32 or float64
};

// grad-weight of an ungrouped layer with few output channels, whose one-pass GEMM would
// have them as its columns (3 of a vector's lanes for an RGB output layer). Here the
// output channels are the rows and the input channels the columns: for each output row
// (n, oh) and tap (kh, kw),
//   partial[tap][co][ci] += sum over ow of grad[n, oh, ow, co] * image[n, oh s + kh d, ow s + kw d, ci]
// a dense GEMM [K x out_w] x [out_w x ldc] whose B rows are image pixels s apart. Chunk j
// takes output rows [j chunk_rows, (j + 1) chunk_rows) into partials[j]; the caller adds
// the chunks in order.
struct NarrowWeightGradArgs {
  const void* image = nullptr;  // [N][rows][cols][ldc]: the zero-padded input, channels zero-padded to ldc
  int64_t rows = 0, cols = 0, ldc = 0;
  const void* grad = nullptr;  // [N][out_h][out_w][out_channels] (NHWC, dense)
  int64_t out_channels = 0, out_h = 0, out_w = 0, total_rows = 0, chunk_rows = 0;
  int64_t kernel_h = 1, kernel_w = 1, stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  void* partials = nullptr;  // [chunks][kernel_h * kernel_w][out_channels][ldc], zeroed
  DType dtype = DType::kFloat32;
};

// Winograd F(2x2, 3x3) for a 3x3, stride-1, undilated, ungrouped convolution (Lavin &
// Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2x2 block of
// output pixels (a tile) comes from the 4x4 input block d around it as
//   Y = A^T [ sum over input channels of (G w G^T) * (B^T d B) ] A   (elementwise *),
// so the 36 multiply-adds of a tile and a (input, output) channel pair become 16, run as
// 16 independent GEMMs [tiles x C] x [C x K], one per element of the 4x4 transformed tile
// (a dense register-tile GEMM). A unit of work is one of `units_per_image` equal runs
// of tile rows of one image: its padded input rows placed as NHWC, the input transform
// into a [16][tiles][C] block, the 16 GEMMs, then the output transform with the bias and
// the ReLU, into NHWC rows or, for NCHW, through an NHWC block transposed into the planes.
struct WinogradArgs {
  // The input as the zero-padded NHWC image it describes (dst unused: the kernel places
  // each unit's rows itself): rows >= 2 tiles_h + 2, cols >= 2 tiles_w + 2, dst_channels
  // = channels.
  PlaceArgs input;
  int64_t channels = 0;
  const void* weight = nullptr;  // U = G w G^T as [16][C][ldw], columns K.. zero
  int64_t ldw = 0;               // a multiple of kColumnPad, >= out_channels
  int64_t out_channels = 0;
  const void* bias = nullptr;  // [ldw] zero-padded, or null
  bool relu = false;
  int64_t out_h = 0, out_w = 0, tiles_h = 0, tiles_w = 0;
  int64_t units_per_image = 1;  // unit u of an image: tile rows [u tiles_h / units, (u + 1) tiles_h / units)
  void* out = nullptr;    // [N, out_h, out_w, K] (NHWC) or [N, K, out_h, out_w] (nchw)
  bool nchw = false;
  DType dtype = DType::kFloat32;  // float32 or float64
};

// grad-weight of the same convolutions through Winograd F(3x3, 2x2): each 2x2 tile of
// grad_output g and the 4x4 input block d under it add A^T [(G' g G'^T) * (B^T d B)] A
// to the 3x3 weight gradient, B^T as in WinogradArgs, G' = [1 0; 1/2 1/2; 1/2 -1/2;
// 0 -1], A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1]: 16 GEMMs [C x tiles] x [tiles x K] summed
// over the tiles, both transforms of a block of tiles built a tile at a time (all 16
// elements from one read of its pixels). Chunk j of `tiles_per_chunk` tiles (tiles
// numbered image by image, row by row) writes its sums of the 16 elements to
// partials[j] ([16][C][ldp], columns K.. unused); the caller adds the chunks in order and
// applies A^T . A.
struct WinogradWeightGradArgs {
  PlaceArgs input;  // as WinogradArgs::input
  int64_t channels = 0;
  PlaceArgs grad;  // grad_output as the [N, 2 tiles_h, 2 tiles_w, K] NHWC image (zero past the output)
  int64_t out_channels = 0;
  int64_t tiles_h = 0, tiles_w = 0, tiles = 0, tiles_per_chunk = 0;
  void* partials = nullptr;  // [chunks][16][C][ldp]
  int64_t ldp = 0;           // round_up(K, kColumnPad)
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
  // Tasks [task_begin, task_end): task n * max(PH, 1) + ph writes the conv rows of
  // window row ph of image n (the last one also the odd row).
  void (*unpool_relu)(const UnpoolArgs& args, int64_t task_begin, int64_t task_end);
  // Units [unit_begin, unit_end) (unit u: image u / units_per_image, its run of tile
  // rows u % units_per_image). False when an output value (before the ReLU)
  // is not finite: the transforms mix the pixels of a tile, so an inf or NaN input, a
  // non-finite weight or an overflow would spread where a direct convolution does not;
  // the caller then runs the direct convolution instead.
  bool (*winograd)(const WinogradArgs& args, int64_t unit_begin, int64_t unit_end);
  // Chunks [chunk_begin, chunk_end).
  void (*winograd_weight_grad)(const WinogradWeightGradArgs& args, int64_t chunk_begin, int64_t chunk_end);
  // Tasks [task_begin, task_end) (task n * dst_h + row: destination row `row` of image n).
  void (*columns_to_image)(const ColumnsToImageArgs& args, int64_t task_begin, int64_t task_end);
  // Chunks [chunk_begin, chunk_end).
  void (*narrow_weight_grad)(const NarrowWeightGradArgs& args, int64_t chunk_begin, int64_t chunk_end);
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

// EdgeGeometry's exact edge pixels of grad_input, written over the GEMM pass's values
// when *weight_finite is false (a device flag: no host synchronization); `grad_output`
// [N, C_out, out_h, out_w] at `grad_output_strides` (elements), `weight` contiguous
// [C_out, C_in / G, kh, kw], `grad_input` dense [N, H, W, C_in]. All of `dtype`.
struct EdgeGradInputCudaArgs {
  EdgeGeometry geometry;
  int64_t batch = 0;
  const void* grad_output = nullptr;
  int64_t grad_output_strides[4] = {0, 0, 0, 0};
  const void* weight = nullptr;
  const bool* weight_finite = nullptr;
  void* grad_input = nullptr;
  DType dtype = DType::kFloat32;
};
int launch_edge_grad_input_cuda(const EdgeGradInputCudaArgs& args, void* stream);
#endif

}  // namespace fastlayers::conv2d

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::conv2d::CpuKernels, conv2d_cpu_kernels)

// fastlayers::conv2d and its backward ops: checks, layout preparation and the CPU
// implementation. Every pass is an offset GEMM (conv2d_kernel.h) on an NHWC image:
//
// * forward: A = the input, zero-padded, NHWC; B = the weight as [kh][kw][ci][co];
//   C = the output as [pixel][co], bias and ReLU applied as each tile is stored.
// * grad-input: a forward over the zero-padded grad_output with the weight flipped and
//   transposed; with stride s, one such pass per phase (a, b) of the input pixels
//   (a + s i, b + s j), with the taps that reach them (no work on zeros).
// * grad-weight: rows = (kh, kw, ci), depth = output pixels, B = grad_output as
//   [pixel][co]; the pixels are split into chunks whose partial sums are added in
//   chunk order (the chunks depend on the shape only: the same bits for any thread
//   count).
// * depthwise (one channel in and out a group): kernels vectorized along the
//   channels instead of the GEMM, for the forward, grad-input and grad-weight.
// * conv2d_relu_max_pool2d: the forward with rows ordered window by window, four
//   pixels a 2x2 window, computed into a per-task scratch block and pooled at once;
//   the pre-pool activation never exists as a tensor, and conv pixels outside every
//   window (odd last row/column) are not computed.
//
// float16/bfloat16 inputs compute in float32 (as torch's CPU convolution accumulates)
// and round the result.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <tuple>
#include <utility>
#include <vector>

#include "common/torch_utils.h"
#include "conv2d/conv2d.h"

namespace fastlayers::conv2d {

static void check_params(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                         int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": stride, padding and dilation must have 2 elements each, got ", stride, ", ", padding, ", ",
              dilation);
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0, op, ": non-positive stride is not supported, got stride=", stride);
  TORCH_CHECK(padding[0] >= 0 && padding[1] >= 0, op, ": negative padding is not supported, got padding=",
              padding);
  TORCH_CHECK(dilation[0] > 0 && dilation[1] > 0, op, ": non-positive dilation is not supported, got dilation=",
              dilation);
  TORCH_CHECK(groups > 0, op, ": non-positive groups is not supported, got groups=", groups);
}

Geometry make_geometry(const char* op, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_params(op, stride, padding, dilation, groups);
  TORCH_CHECK(input_size.size() == 4, op, ": expected a 4-D input (N, C, H, W), got shape ", input_size);
  TORCH_CHECK(weight_size.size() == 4, op, ": expected a 4-D weight (C_out, C_in / groups, kH, kW), got shape ",
              weight_size);
  // The backward ops take these sizes as int[] arguments: negative ones would turn
  // the shape checks below into nonsense (and -1 / 2 == 0 in C++).
  TORCH_CHECK(std::all_of(input_size.begin(), input_size.end(), [](int64_t s) { return s >= 0; }), op,
              ": input_size must be non-negative, got ", input_size);
  TORCH_CHECK(std::all_of(weight_size.begin(), weight_size.end(), [](int64_t s) { return s >= 0; }), op,
              ": weight_size must be non-negative, got ", weight_size);
  Geometry g;
  g.batch = input_size[0];
  g.in_channels = input_size[1];
  g.height = input_size[2];
  g.width = input_size[3];
  g.out_channels = weight_size[0];
  g.kernel_h = weight_size[2];
  g.kernel_w = weight_size[3];
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  g.groups = groups;
  TORCH_CHECK(g.out_channels >= groups, op, ": given groups=", groups, ", expected weight to be at least ", groups,
              " at dimension 0, but got weight of size ", weight_size, " instead");
  TORCH_CHECK(g.out_channels % groups == 0, op, ": given groups=", groups, ", expected weight to be divisible by ",
              groups, " at dimension 0, but got weight of shape ", weight_size);
  TORCH_CHECK(g.in_channels == weight_size[1] * groups, op, ": given groups=", groups, ", weight of size ",
              weight_size, ", expected input", input_size, " to have ", weight_size[1] * groups,
              " channels, but got ", g.in_channels, " channels instead");
  // torch returns a tensor of 0 output channels here, contradicting its weight; an
  // error is clearer than either that shape or the bias broadcast the math would give.
  TORCH_CHECK(g.in_channels > 0, op, ": a convolution over 0 input channels is not supported, got input of shape ",
              input_size, " and weight of shape ", weight_size);
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0, op, ": weight must have a non-empty kernel, got shape ",
              weight_size);
  const int64_t span_h = g.dilation_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dilation_w * (g.kernel_w - 1) + 1;
  TORCH_CHECK(g.height + 2 * g.pad_h >= span_h && g.width + 2 * g.pad_w >= span_w, op,
              ": calculated padded input size per channel: (", g.height + 2 * g.pad_h, " x ",
              g.width + 2 * g.pad_w, "). Kernel size: (", span_h, " x ", span_w,
              "). Kernel size can't be greater than actual input size");
  g.out_h = (g.height + 2 * g.pad_h - span_h) / g.stride_h + 1;
  g.out_w = (g.width + 2 * g.pad_w - span_w) / g.stride_w + 1;
  return g;
}

void check_same(const char* op, const at::Tensor& input, const char* arg, const at::Tensor& other) {
  TORCH_CHECK(other.device() == input.device(), op, ": ", arg, " is on ", other.device(), " but input is on ",
              input.device());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(), op, ": input type (", input.scalar_type(), ") and ", arg,
              " type (", other.scalar_type(), ") should be the same");
}

namespace {
void check_grad_output(const char* op, const at::Tensor& grad_output, const Geometry& g) {
  TORCH_CHECK(grad_output.dim() == 4 && grad_output.size(0) == g.batch && grad_output.size(1) == g.out_channels &&
                  grad_output.size(2) == g.out_h && grad_output.size(3) == g.out_w,
              op, ": expected grad_output of shape [", g.batch, ", ", g.out_channels, ", ", g.out_h, ", ", g.out_w,
              "], got ", grad_output.sizes());
}
}  // namespace

Geometry check_backward_input(const at::Tensor& grad_output, const at::Tensor& weight, at::IntArrayRef input_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  const char* op = "conv2d_backward_input";
  kernel_dtype(grad_output, op, "grad_output");
  check_same(op, grad_output, "weight", weight);
  const Geometry g = make_geometry(op, input_size, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output(op, grad_output, g);
  return g;
}

Geometry check_backward_weight(const at::Tensor& grad_output, const at::Tensor& input, at::IntArrayRef weight_size,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               int64_t groups) {
  const char* op = "conv2d_backward_weight";
  kernel_dtype(input, op, "input");
  check_same(op, input, "grad_output", grad_output);
  const Geometry g = make_geometry(op, input.sizes(), weight_size, stride, padding, dilation, groups);
  check_grad_output(op, grad_output, g);
  return g;
}

Geometry check_forward(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups) {
  kernel_dtype(input, op, "input");
  check_same(op, input, "weight", weight);
  Geometry g = make_geometry(op, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  TORCH_CHECK(g.batch == 0 || (g.height > 0 && g.width > 0), op,
              ": only zero batch or zero channel inputs are supported, but got input shape: ", input.sizes());
  if (bias.has_value()) {
    check_same(op, input, "bias", *bias);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels, op, ": expected bias of shape [",
                g.out_channels, "] (the weight's dimension 0), got ", bias->sizes());
  }
  return g;
}

bool wants_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
         weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

// Positions [0, first) and [size - last, size) of one dimension include every position
// with a tap landing outside [0, out).
static std::pair<int64_t, int64_t> outside_tap_span(int64_t size, int64_t out, int64_t kernel, int64_t stride,
                                                    int64_t pad, int64_t dilation) {
  int64_t first = 0, last = 0;
  const auto visit = [&](int64_t i) {
    for (int64_t k = 0; k < kernel; ++k) {
      const int64_t reach = i + pad - k * dilation;
      if (((reach % stride) + stride) % stride != 0) continue;  // tap k never reaches i
      if (reach < 0) first = std::max(first, i + 1);
      if (reach >= 0 && reach / stride >= out) last = std::max(last, size - i);
    }
  };
  // Only positions near the ends can have such a tap: from i >= (kernel - 1) dilation -
  // pad every reach is >= 0, below i < out stride - pad every reach / stride < out. (All
  // of [0, size) took 10% of a 16,000-sample, 80-tap Conv1d's grad-input.)
  const int64_t low_end = std::clamp<int64_t>((kernel - 1) * dilation - pad + 1, 0, size);
  const int64_t high_begin = std::clamp<int64_t>(out * stride - pad, low_end, size);
  for (int64_t i = 0; i < low_end; ++i) visit(i);
  for (int64_t i = high_begin; i < size; ++i) visit(i);
  first = std::min(first, size);
  return {first, std::min(last, size - first)};
}

EdgeGeometry edge_geometry(const Geometry& g) {
  EdgeGeometry e;
  e.height = g.height;
  e.width = g.width;
  e.out_h = g.out_h;
  e.out_w = g.out_w;
  e.kernel_h = g.kernel_h;
  e.kernel_w = g.kernel_w;
  e.stride_h = g.stride_h;
  e.stride_w = g.stride_w;
  e.pad_h = g.pad_h;
  e.pad_w = g.pad_w;
  e.dilation_h = g.dilation_h;
  e.dilation_w = g.dilation_w;
  e.in_channels = g.in_channels;
  e.in_per_group = g.in_per_group();
  e.out_per_group = g.out_per_group();
  std::tie(e.top, e.bottom) = outside_tap_span(g.height, g.out_h, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
  std::tie(e.left, e.right) = outside_tap_span(g.width, g.out_w, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
  return e;
}

namespace {

int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The PlaceArgs of x placed into a [N, rows, cols, channels] image (dst left null).
PlaceArgs place_args(const at::Tensor& x, int64_t rows, int64_t cols, int64_t top, int64_t left, int64_t step_h,
                     int64_t step_w, int64_t channels) {
  PlaceArgs args;
  args.src = x.const_data_ptr();
  for (int d = 0; d < 4; ++d) args.src_stride[d] = x.stride(d);
  args.channels = x.size(1);
  args.height = x.size(2);
  args.width = x.size(3);
  args.rows = rows;
  args.cols = cols;
  args.dst_channels = channels;
  args.top = top;
  args.left = left;
  args.step_h = step_h;
  args.step_w = step_w;
  args.dtype = x.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  return args;
}

// [N, C, H, W] values (float or double, any strides) placed into a zero [N, rows,
// cols, C] (NHWC) image: element (i, j) lands at (top + i * step_h, left + j * step_w);
// what falls outside is dropped; `channels` >= C pads each pixel with zeros. One pass
// (PlaceArgs); an input that already is the image (channels_last, no padding) is used
// in place.
at::Tensor place_nhwc(const at::Tensor& x, int64_t rows, int64_t cols, int64_t top, int64_t left, int64_t step_h,
                      int64_t step_w, int64_t channels = -1) {
  if (channels < 0) channels = x.size(1);
  at::Tensor nhwc = x.permute({0, 2, 3, 1});
  if (channels == x.size(1) && top == 0 && left == 0 && step_h == 1 && step_w == 1 && rows == x.size(2) && cols == x.size(3) &&
      nhwc.is_contiguous()) {
    return nhwc;
  }
  at::Tensor image = at::empty({x.size(0), rows, cols, channels}, x.options());
  if (image.numel() == 0) return image;
  PlaceArgs args = place_args(x, rows, cols, top, left, step_h, step_w, channels);
  args.dst = image.mutable_data_ptr();
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, cols * channels));
  at::parallel_for(0, x.size(0) * rows, grain,
                   [&](int64_t begin, int64_t end) { kernels.place_image(args, begin, end); });
  return image;
}

// [G, rows, cols] -> [G, rows, round_up(cols, kColumnPad)], zero-filled.
at::Tensor pad_columns(const at::Tensor& b) {
  const int64_t cols = b.size(2);
  at::Tensor padded = at::zeros({b.size(0), b.size(1), round_up(std::max<int64_t>(cols, 1), kColumnPad)},
                                b.options());
  padded.narrow(2, 0, cols).copy_(b);
  return padded;
}

// The offset-GEMM description of one convolution over an NHWC image, or (nchw) over a
// contiguous NCHW tensor read in place.
struct ConvPass {
  at::Tensor image;  // [N, rows, cols, channels], contiguous; nchw: [N, channels, rows, cols]
  bool nchw = false;
  int64_t origin = 0;  // element offset of output pixel (0, 0)'s field corner in image 0
  int64_t out_h = 0, out_w = 0, stride_h = 1, stride_w = 1, dilation_h = 1, dilation_w = 1;
  int64_t kernel_h = 1, kernel_w = 1, groups = 1;
  int64_t depth_channels = 0;  // per group
  int64_t out_columns = 0;     // per group
  at::Tensor packed;           // [G, kernel_h * kernel_w * depth_channels, ldb]
  at::Tensor bias;             // [G, ldb] or undefined
  bool relu = false;
};

// Element strides of a pass's image: one image, a row, a column, a channel.
struct ImageSteps {
  int64_t image, row, col, channel;
};
ImageSteps image_steps(const ConvPass& p) {
  const int64_t rows = p.image.size(p.nchw ? 2 : 1), cols = p.image.size(p.nchw ? 3 : 2);
  const int64_t channels = p.image.size(p.nchw ? 1 : 3);
  const int64_t col = p.nchw ? 1 : channels;
  return {rows * cols * channels, cols * col, col, p.nchw ? rows * cols : 1};
}

// Offsets of the receptive-field corners of output pixels (n, oh, ow) in `image`.
std::vector<int64_t> pixel_offsets(const ConvPass& p) {
  const ImageSteps step = image_steps(p);
  std::vector<int64_t> offsets(size_t(p.image.size(0) * p.out_h * p.out_w));
  int64_t* o = offsets.data();
  for (int64_t b = 0; b < p.image.size(0); ++b)
    for (int64_t oh = 0; oh < p.out_h; ++oh)
      for (int64_t ow = 0; ow < p.out_w; ++ow)
        *o++ = b * step.image + oh * p.stride_h * step.row + ow * p.stride_w * step.col + p.origin;
  return offsets;
}

// Offsets of (kh, kw, ci) inside a receptive field, ci within one group.
std::vector<int64_t> field_offsets(const ConvPass& p) {
  const ImageSteps step = image_steps(p);
  std::vector<int64_t> offsets;
  offsets.reserve(size_t(p.kernel_h * p.kernel_w * p.depth_channels));
  for (int64_t kh = 0; kh < p.kernel_h; ++kh)
    for (int64_t kw = 0; kw < p.kernel_w; ++kw)
      for (int64_t ci = 0; ci < p.depth_channels; ++ci)
        offsets.push_back(kh * p.dilation_h * step.row + kw * p.dilation_w * step.col + ci * step.channel);
  return offsets;
}

// A 1x1, stride-1, unpadded, ungrouped convolution over a contiguous NCHW tensor reads
// it in place (ConvPass::nchw): a pass's A rows are pixels (adjacent elements) and its
// depth the channels (H * W apart), so the NHWC placement, a transpose through memory,
// is not needed (it took 30-40% of the 1x1 grad passes' samples). Measured against
// torch at B=32 C=64->128 32x32: grad-input 0.73x -> 1.56x, grad-weight (whose
// grad_output is still placed) 0.66x -> 0.89x, the module's train step 0.76x -> 1.05x.
bool reads_nchw_in_place(const at::Tensor& t, const Geometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 &&
         g.pad_w == 0 && g.groups == 1 && t.is_contiguous();
}

// Rows a parallel task computes: a multiple of every tile height (6, 8, 12) and of the
// 4 rows of a pooling window; smaller when there would be too few tasks for the threads.
int64_t rows_per_task(int64_t rows, int64_t groups) {
  const int64_t target_tasks = 8 * at::get_num_threads();
  int64_t block = 192;
  while (block > 24 && groups * ((rows + block - 1) / block) < target_tasks) block /= 2;
  return block;
}

OffsetGemmArgs gemm_args(const ConvPass& p, const int64_t* row_offsets, const int64_t* depth_offsets,
                         int64_t group, void* c, int64_t ldc) {
  const int64_t elem = p.image.element_size();
  OffsetGemmArgs args;
  args.a = static_cast<const char*>(p.image.const_data_ptr()) + group * p.depth_channels * elem;
  args.row_offsets = row_offsets;
  args.depth_offsets = depth_offsets;
  args.depth = p.packed.size(1);
  args.ldb = p.packed.size(2);
  args.b = static_cast<const char*>(p.packed.const_data_ptr()) + group * args.depth * args.ldb * elem;
  args.c = static_cast<char*>(c) + group * p.out_columns * elem;
  args.ldc = ldc;
  args.columns = p.out_columns;
  args.bias = p.bias.defined() ? static_cast<const char*>(p.bias.const_data_ptr()) + group * args.ldb * elem
                               : nullptr;
  args.relu = p.relu;
  args.dtype = p.image.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  return args;
}

// Runs a pass into a new [N, G * out_columns, out_h, out_w] tensor, channels_last or
// contiguous. Channels_last: the tiles are stored straight into the NHWC output.
// Contiguous (NCHW): each task computes its rows into an NHWC scratch block (L2-sized)
// and writes it out channel by channel, instead of a separate transpose through memory.
at::Tensor run_pass(const ConvPass& p, bool channels_last) {
  const int64_t n = p.image.size(0), columns = p.groups * p.out_columns;
  const int64_t rows = n * p.out_h * p.out_w;
  at::Tensor out = channels_last
                       ? at::empty({n, p.out_h, p.out_w, columns}, p.image.options()).permute({0, 3, 1, 2})
                       : at::empty({n, columns, p.out_h, p.out_w}, p.image.options());
  if (rows == 0 || out.numel() == 0) return out;
  const std::vector<int64_t> rows_offsets = pixel_offsets(p);
  const std::vector<int64_t> depth_offsets = field_offsets(p);
  const int64_t block = rows_per_task(rows, 1);
  const int64_t blocks = (rows + block - 1) / block;
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  const int64_t elem = p.image.element_size();
  const DType dtype = p.image.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  void* dst = out.mutable_data_ptr();
  // Depthwise (one channel in and out a group): the channel-vectorized kernel; its
  // weight [taps][channels] and bias [channels] are column 0 of the packed ones.
  const bool depthwise = p.depth_channels == 1 && p.out_columns == 1 && p.groups > 1;
  at::Tensor dw_weight, dw_bias;
  DepthwiseArgs dw;
  if (depthwise) {
    dw_weight = p.packed.select(2, 0).t().contiguous();
    if (p.bias.defined()) dw_bias = p.bias.select(1, 0).contiguous();
    dw.image = p.image.const_data_ptr();
    dw.row_offsets = rows_offsets.data();
    dw.tap_offsets = depth_offsets.data();
    dw.taps = dw_weight.size(0);
    dw.weight = dw_weight.const_data_ptr();
    dw.bias = dw_bias.defined() ? dw_bias.const_data_ptr() : nullptr;
    dw.relu = p.relu;
    dw.ldc = columns;
    dw.channels = columns;
    dw.dtype = dtype;
  }
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<char> scratch(channels_last ? 0 : size_t(block * columns * elem));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row_begin = task * block, row_end = std::min(rows, row_begin + block);
      if (depthwise) {
        DepthwiseArgs args = dw;
        if (channels_last) {
          args.c = dst;
          kernels.depthwise(args, row_begin, row_end);
        } else {
          args.c = scratch.data();
          args.row_offsets = rows_offsets.data() + row_begin;
          kernels.depthwise(args, 0, row_end - row_begin);
        }
      }
      for (int64_t group = 0; group < (depthwise ? 0 : p.groups); ++group) {
        if (channels_last) {
          OffsetGemmArgs args = gemm_args(p, rows_offsets.data(), depth_offsets.data(), group, dst, columns);
          kernels.offset_gemm(args, row_begin, row_end);
        } else {
          OffsetGemmArgs args = gemm_args(p, rows_offsets.data() + row_begin, depth_offsets.data(), group,
                                          scratch.data(), columns);
          kernels.offset_gemm(args, 0, row_end - row_begin);
        }
      }
      if (!channels_last) {
        StoreNchwArgs store;
        store.block = scratch.data();
        store.ldc = columns;
        store.columns = columns;
        store.first_pixel = row_begin;
        store.plane = p.out_h * p.out_w;
        store.dst = dst;
        store.dtype = dtype;
        kernels.store_nchw(store, 0, row_end - row_begin);
      }
    }
  });
  return out;
}

bool is_reduced_precision(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
}

at::Tensor to_compute(const at::Tensor& t) { return is_reduced_precision(t) ? t.to(at::kFloat) : t; }

// Weight [C_out, C_in/G, kh, kw] -> B [G, kh * kw * C_in/G, pad(C_out/G)].
at::Tensor pack_forward_weight(const at::Tensor& weight, const Geometry& g) {
  at::Tensor w = weight.reshape({g.groups, g.out_per_group(), g.in_per_group(), g.kernel_h, g.kernel_w});
  return pad_columns(w.permute({0, 3, 4, 2, 1}).reshape({g.groups, -1, g.out_per_group()}));
}

// The pass over the zero-padded input image, without its B operand.
ConvPass input_pass(const at::Tensor& input, const Geometry& g) {
  ConvPass p;
  p.nchw = reads_nchw_in_place(input, g);
  p.image = p.nchw ? input : place_nhwc(input, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.pad_h, g.pad_w, 1, 1);
  p.out_h = g.out_h;
  p.out_w = g.out_w;
  p.stride_h = g.stride_h;
  p.stride_w = g.stride_w;
  p.dilation_h = g.dilation_h;
  p.dilation_w = g.dilation_w;
  p.kernel_h = g.kernel_h;
  p.kernel_w = g.kernel_w;
  p.groups = g.groups;
  p.depth_channels = g.in_per_group();
  p.out_columns = g.out_per_group();
  return p;
}

ConvPass forward_pass(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      const Geometry& g, bool relu) {
  ConvPass p = input_pass(input, g);
  p.packed = pack_forward_weight(weight, g);
  if (bias.has_value()) p.bias = pad_columns(bias->reshape({g.groups, 1, g.out_per_group()})).squeeze(1);
  p.relu = relu;
  return p;
}

// [N, H, W, C] -> an [N, C, H, W] tensor, channels_last or contiguous.
at::Tensor from_nhwc(const at::Tensor& nhwc, bool channels_last) {
  at::Tensor nchw = nhwc.permute({0, 3, 1, 2});
  return channels_last ? nchw : nchw.contiguous();
}

// Winograd F(2x2, 3x3) (WinogradArgs in conv2d_kernel.h) runs the forward of 3x3,
// stride-1, undilated, ungrouped convolutions with at least 16 input and output channels:
// 16 multiply-adds per 2x2 output pixels and channel pair instead of 36 (B32 C64->128
// 32x32 NCHW: 6.3-6.9 ms instead of the direct pass's 12.2; B64 C32->64 16x16: 0.80-0.85
// ms, of which the GEMMs ~0.55, the output transform ~0.1). Fewer channels would leave
// the transforms a larger share than the GEMMs save. Its float32 rounding error was
// 0.5-1.0x torch's (direct, oneDNN) on five shapes measured against float64 (the tests
// allow 2x). Larger tiles would save more multiply-adds but not that accuracy: in a
// float32 model F(4x4, 3x3) erred 4-30x torch's (points 0, +-1, +-2 and 0, +-1, 1/2, -2),
// F(4x2, 3x3) 2-6x, F(3x3, 3x3) 4-23x, at C 32-128.
bool winograd_applies(const Geometry& g) {
  return g.kernel_h == 3 && g.kernel_w == 3 && g.stride_h == 1 && g.stride_w == 1 && g.dilation_h == 1 &&
         g.dilation_w == 1 && g.groups == 1 && g.in_channels >= 16 && g.out_channels >= 16 && g.batch > 0 &&
         g.out_h > 0 && g.out_w > 0;
}

// U[4a + b][c][k] = (G w[k][c] G^T)[a][b], G = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1],
// computed in double and rounded once, packed as the 16 GEMMs' B operands [16][C][ldw].
// A plain loop: through ATen (two products, permutes, padding) it took ~4% of the B32
// C64->128 32x32 forward. `for_grad_input`: the transform of the grad-input's weight,
// w[c][k] flipped in both taps, read in place (the flipped copy it replaces took ~18 us
// a call in torch's profiler).
at::Tensor winograd_weight(const at::Tensor& weight, bool for_grad_input = false) {
  const int64_t K = weight.size(for_grad_input ? 1 : 0), C = weight.size(for_grad_input ? 0 : 1);
  const int64_t ldw = round_up(std::max<int64_t>(K, 1), kColumnPad);
  at::Tensor u = at::empty({16, C, ldw}, weight.options());
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "winograd_weight", [&] {
    // Taps through raw strides, the flip as negative steps from the last tap.
    const scalar_t* w = weight.const_data_ptr<scalar_t>();
    const int64_t k_stride = weight.stride(for_grad_input ? 1 : 0), c_stride = weight.stride(for_grad_input ? 0 : 1);
    const int64_t row_step = for_grad_input ? -weight.stride(2) : weight.stride(2);
    const int64_t col_step = for_grad_input ? -weight.stride(3) : weight.stride(3);
    const int64_t first_tap = for_grad_input ? 2 * (weight.stride(2) + weight.stride(3)) : 0;
    scalar_t* out = u.mutable_data_ptr<scalar_t>();
    // An input channel's 16 rows of ldw are built here and copied out whole: stored a
    // value at a time, the 16 values of a channel pair went C * ldw apart (8 KiB at C32
    // K64, one L1 set) and the transform ran at ~30 ns a pair instead of ~6 (a third of
    // a batch-1 16x16 forward's time).
    at::parallel_for(0, C, std::max<int64_t>(1, 512 / std::max<int64_t>(K, 1)), [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> rows(static_cast<size_t>(16 * ldw), scalar_t(0));
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t k = 0; k < K; ++k) {
          const scalar_t* taps = w + k * k_stride + c * c_stride + first_tap;
          double gw[4][3];  // G w
          for (int j = 0; j < 3; ++j) {
            const double w0 = taps[j * col_step], w1 = taps[row_step + j * col_step];
            const double w2 = taps[2 * row_step + j * col_step];
            gw[0][j] = w0;
            gw[1][j] = 0.5 * (w0 + w1 + w2);
            gw[2][j] = 0.5 * (w0 - w1 + w2);
            gw[3][j] = w2;
          }
          for (int a = 0; a < 4; ++a) {
            const double row[4] = {gw[a][0], 0.5 * (gw[a][0] + gw[a][1] + gw[a][2]),
                                   0.5 * (gw[a][0] - gw[a][1] + gw[a][2]), gw[a][2]};
            for (int b = 0; b < 4; ++b) rows[(4 * a + b) * ldw + k] = static_cast<scalar_t>(row[b]);
          }
        }
        for (int e = 0; e < 16; ++e) {
          std::memcpy(out + (e * C + c) * ldw, rows.data() + e * ldw, size_t(ldw) * sizeof(scalar_t));
        }
      }
    });
  });
  return u;
}

// The forward through Winograd with the transformed weight u (winograd_weight), or an
// undefined tensor when a value came out non-finite (the direct pass then gives torch's
// answer for infs and NaNs).
at::Tensor winograd_forward(const at::Tensor& input, const at::Tensor& u, const std::optional<at::Tensor>& bias,
                            const Geometry& g, bool relu, bool channels_last) {
  WinogradArgs args;
  args.tiles_h = (g.out_h + 1) / 2;
  args.tiles_w = (g.out_w + 1) / 2;
  args.input = place_args(input, 2 * args.tiles_h + 2, 2 * args.tiles_w + 2, g.pad_h, g.pad_w, 1, 1,
                          g.in_channels);
  const at::Tensor b = bias.has_value() ? pad_columns(bias->reshape({1, 1, g.out_channels})).view({-1}) : at::Tensor();
  at::Tensor out = channels_last
                       ? at::empty({g.batch, g.out_h, g.out_w, g.out_channels}, input.options()).permute({0, 3, 1, 2})
                       : at::empty({g.batch, g.out_channels, g.out_h, g.out_w}, input.options());
  args.channels = g.in_channels;
  args.weight = u.const_data_ptr();
  args.ldw = u.size(2);
  args.out_channels = g.out_channels;
  args.bias = b.defined() ? b.const_data_ptr() : nullptr;
  args.relu = relu;
  args.out_h = g.out_h;
  args.out_w = g.out_w;
  // ~24 tiles a unit (the GEMMs' rows), in runs of tile rows of equal length: measured
  // against 12..96 (B32 C64->128 32x32, B64 C32->64 16x16, B8 C128 56x56), 24 was within
  // noise of the best for all three; 48 ran the 16x16 layer 20% slower.
  args.units_per_image = std::clamp<int64_t>((args.tiles_h * args.tiles_w + 12) / 24, 1, args.tiles_h);
  args.out = out.mutable_data_ptr();
  args.nchw = !channels_last;
  args.dtype = input.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  const int64_t units = g.batch * args.units_per_image;
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  std::atomic<bool> finite{true};
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    if (!kernels.winograd(args, begin, end)) finite = false;
  });
  return finite ? out : at::Tensor();
}

// Whether every element of a contiguous float or double tensor is finite: an integer
// test of the exponent bits (all ones: inf or NaN) that the compiler vectorizes, a few
// microseconds for a large layer's weight.
template <class T, class Bits>
bool all_finite_typed(const at::Tensor& t) {
  static_assert(sizeof(T) == sizeof(Bits));
  constexpr Bits kExponent = sizeof(T) == 4 ? Bits(0x7f800000u) : Bits(0x7ff0000000000000ull);
  const Bits* bits = reinterpret_cast<const Bits*>(t.const_data_ptr<T>());
  const int64_t n = t.numel();
  Bits non_finite = 0;
  for (int64_t i = 0; i < n; ++i) non_finite |= Bits((bits[i] & kExponent) == kExponent);
  return non_finite == 0;
}

bool all_finite(const at::Tensor& t) {
  const at::Tensor c = t.contiguous();
  return c.scalar_type() == at::kDouble ? all_finite_typed<double, uint64_t>(c) : all_finite_typed<float, uint32_t>(c);
}

// A columns pass (ColumnsToImageArgs) of an ungrouped layer into a new [N, C, H, W]
// tensor, channels_last or contiguous: the forward's output from the input (with bias and
// ReLU), or grad-input from grad_output. The offset GEMM over the source's pixels (rows;
// depth = the source channels, a 1x1 field: a contiguous NCHW source is read in place,
// else placed as NHWC; B = the weight as [source channel][(kh, kw, destination
// channel)]) gives each pixel's columns, then every destination row sums them
// (columns_to_image). Images are taken in chunks so that the columns of a chunk stay
// within a few MB (L3).
at::Tensor columns_pass(const at::Tensor& source, const at::Tensor& weight, const Geometry& g, bool forward,
                        bool channels_last, const std::optional<at::Tensor>& bias = std::nullopt, bool relu = false) {
  TORCH_INTERNAL_ASSERT(g.groups == 1);
  ColumnsToImageArgs args;
  args.forward = forward;
  args.kernel_h = g.kernel_h;
  args.kernel_w = g.kernel_w;
  args.stride_h = g.stride_h;
  args.stride_w = g.stride_w;
  args.pad_h = g.pad_h;
  args.pad_w = g.pad_w;
  args.dilation_h = g.dilation_h;
  args.dilation_w = g.dilation_w;
  args.channels = forward ? g.out_channels : g.in_channels;
  ConvPass p;
  p.nchw = source.is_contiguous();
  p.image = p.nchw ? source : place_nhwc(source, source.size(2), source.size(3), 0, 0, 1, 1);
  p.out_h = source.size(2);
  p.out_w = source.size(3);
  p.depth_channels = source.size(1);
  p.out_columns = g.kernel_h * g.kernel_w * args.channels;
  p.packed = pad_columns((forward ? weight.permute({1, 2, 3, 0}) : weight.permute({0, 2, 3, 1}))
                             .reshape({1, p.depth_channels, p.out_columns}));
  at::Tensor dst = at::empty({g.batch, args.channels, forward ? g.out_h : g.height, forward ? g.out_w : g.width},
                             source.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                          : at::MemoryFormat::Contiguous));
  const at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  args.bias = b.defined() ? b.const_data_ptr() : nullptr;
  args.relu = relu;
  args.ldc = p.out_columns;
  args.src_h = p.out_h;
  args.src_w = p.out_w;
  args.dst_h = dst.size(2);
  args.dst_w = dst.size(3);
  for (int d = 0; d < 4; ++d) args.out_stride[d] = dst.stride(d);
  args.dtype = source.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  const int64_t element = source.element_size();
  constexpr int64_t kChunkBytes = int64_t{4} << 20;
  const int64_t image_bytes = args.src_h * args.src_w * args.ldc * element;
  const int64_t chunk = std::max<int64_t>(1, kChunkBytes / std::max<int64_t>(1, image_bytes));
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 13) / std::max<int64_t>(1, args.dst_w * args.channels));
  for (int64_t first = 0; first < g.batch; first += chunk) {
    const int64_t images = std::min(chunk, g.batch - first);
    ConvPass part = p;
    part.image = p.image.narrow(0, first, images);
    const at::Tensor columns = run_pass(part, /*channels_last=*/true);  // [images][src_h][src_w][ldc] in memory
    ColumnsToImageArgs chunk_args = args;
    chunk_args.columns = columns.const_data_ptr();
    chunk_args.out = static_cast<char*>(dst.mutable_data_ptr()) + first * dst.stride(0) * element;
    at::parallel_for(0, images * args.dst_h, grain,
                     [&](int64_t begin, int64_t end) { kernels.columns_to_image(chunk_args, begin, end); });
  }
  return dst;
}

// Whether the forward goes through columns (ColumnsToImageArgs): an ungrouped stride-1
// layer with at most 6 output channels (the one-pass GEMM's columns: a few lanes of a
// vector) and a finite weight (grouped: as grad_input_by_columns, C=32 -> 64 in 32 groups
// ran 0.94x -> 0.25x). The columns path never multiplies the zero padding, where torch's
// sum makes 0 * inf = NaN; with a stride it would compute the columns of input pixels
// no output pixel pairs with. Measured (2 threads, ratio to torch's forward / train
// step, direct -> columns): 3x3 C=64->3 64x64 0.81x -> 2.60x / 0.96x -> 1.23x, C=64->1
// 0.78x -> 4.48x / 0.90x -> 1.46x, 7x7 C=64->3 0.65x -> 2.33x / 0.90x -> 1.32x, C=32->6
// 0.87x -> 1.32x / 0.94x -> 1.09x, float64 C=64->3 3.6x -> 7.9x; C=32->8 0.81x -> 0.98x
// forward but a slower train step, C=32->12 slower in both.
bool forward_by_columns(const Geometry& g, const at::Tensor& w) {
  if (g.groups > 1 || g.kernel_h * g.kernel_w == 1 || g.stride_h > 1 || g.stride_w > 1) return false;
  return g.out_channels <= 6 && all_finite(w);
}

at::Tensor conv2d_cpu(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                      at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
                      bool relu) {
  const Geometry g = check_forward("conv2d", input, weight, bias, stride, padding, dilation, groups);
  const bool channels_last = wants_channels_last(input, weight);
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(to_compute(*bias)) : std::nullopt;
  const at::Tensor x = to_compute(input), w = to_compute(weight);
  if (winograd_applies(g)) {
    const at::Tensor out = winograd_forward(x, winograd_weight(w), b, g, relu, channels_last);
    if (out.defined()) return out.to(input.scalar_type());
  }
  if (forward_by_columns(g, w)) {
    return columns_pass(x, w, g, /*forward=*/true, channels_last, b, relu).to(input.scalar_type());
  }
  return run_pass(forward_pass(x, w, b, g, relu), channels_last).to(input.scalar_type());
}

// The kernel taps of one dimension that reach input positions i = phase + stride * i'
// (i' >= 0): tap k reaches them from grad_output row i' + (phase + pad - k * dilation) /
// stride when that division is exact. Listed by increasing row offset (decreasing k);
// the offsets step evenly, by dilation / gcd(dilation, stride).
struct PhaseTaps {
  std::vector<int64_t> taps;
  int64_t first_offset = 0;
  int64_t offset_step = 1;
};

PhaseTaps phase_taps(int64_t phase, int64_t kernel, int64_t stride, int64_t pad, int64_t dilation) {
  PhaseTaps t;
  for (int64_t k = kernel - 1; k >= 0; --k) {
    const int64_t reach = phase + pad - k * dilation;
    if (((reach % stride) + stride) % stride == 0) t.taps.push_back(k);
  }
  if (!t.taps.empty()) t.first_offset = (phase + pad - t.taps[0] * dilation) / stride;  // exact
  if (t.taps.size() > 1) t.offset_step = (t.taps[0] - t.taps[1]) * dilation / stride;
  return t;
}

// EdgeGeometry's exact sum over the taps that land inside grad_output, written over
// the edge pixels of grad_input (any strides). Scalar: it only runs for a non-finite
// weight.
template <class T>
void recompute_edge_grad_input(const at::Tensor& grad_output, const at::Tensor& weight, const EdgeGeometry& e,
                               at::Tensor& grad_input) {
  const auto go = grad_output.accessor<T, 4>();
  const auto w = weight.accessor<T, 4>();
  auto out = grad_input.accessor<T, 4>();
  const int64_t pixels = e.pixels();
  at::parallel_for(0, grad_input.size(0) * pixels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / pixels;
      int64_t ih = 0, iw = 0;
      e.pixel(task % pixels, ih, iw);
      const auto image = go[n];
      const auto grad_output_at = [&](int64_t co, int64_t oh, int64_t ow) { return image[co][oh][ow]; };
      const auto weight_at = [&](int64_t co, int64_t cl, int64_t kh, int64_t kw) { return w[co][cl][kh][kw]; };
      for (int64_t ci = 0; ci < e.in_channels; ++ci) {
        out[n][ci][ih][iw] = edge_grad_input_sum<T>(e, ih, iw, ci, grad_output_at, weight_at);
      }
    }
  });
}

// grad-input, one stride phase at a time: the input pixels (a + s_h i, b + s_w j) only
// receive the taps of phase (a, b), so each phase is a stride-1 convolution of the
// zero-padded grad_output with those taps (flipped, transposed) and no work is spent
// on zeros. Stride 1 is the single phase with every tap. The result has
// the compute dtype (float or double), NCHW or channels_last as grad_output.
at::Tensor grad_input_passes(const at::Tensor& go, const at::Tensor& weight, const Geometry& g) {
  const bool channels_last = go.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  const at::Tensor w = weight.reshape({g.groups, g.out_per_group(), g.in_per_group(), g.kernel_h, g.kernel_w});
  const std::vector<int64_t> input_size = {g.batch, g.in_channels, g.height, g.width};
  const bool single_phase = g.stride_h == 1 && g.stride_w == 1;
  at::Tensor grad_input;
  if (!single_phase) {
    grad_input = at::empty({g.batch, g.in_channels, g.height, g.width},
                           go.options().memory_format(channels_last ? at::MemoryFormat::ChannelsLast
                                                                    : at::MemoryFormat::Contiguous));
  }
  for (int64_t a = 0; a < std::min(g.stride_h, g.height); ++a) {
    for (int64_t b = 0; b < std::min(g.stride_w, g.width); ++b) {
      const PhaseTaps th = phase_taps(a, g.kernel_h, g.stride_h, g.pad_h, g.dilation_h);
      const PhaseTaps tw = phase_taps(b, g.kernel_w, g.stride_w, g.pad_w, g.dilation_w);
      const int64_t phase_h = (g.height - a + g.stride_h - 1) / g.stride_h;
      const int64_t phase_w = (g.width - b + g.stride_w - 1) / g.stride_w;
      at::Tensor target;
      if (!single_phase) {
        target = grad_input.slice(2, a, g.height, g.stride_h).slice(3, b, g.width, g.stride_w);
      }
      if (th.taps.empty() || tw.taps.empty()) {  // no tap reaches these input pixels
        if (single_phase) return at::zeros(input_size, go.options());
        target.zero_();
        continue;
      }
      const int64_t nh = int64_t(th.taps.size()), nw = int64_t(tw.taps.size());
      // Zero rows above (and left of) grad_output so that every offset is >= 0.
      const int64_t top = std::max<int64_t>(0, -th.first_offset), left = std::max<int64_t>(0, -tw.first_offset);
      const int64_t rows = std::max(top + g.out_h, top + th.first_offset + (nh - 1) * th.offset_step + phase_h);
      const int64_t cols = std::max(left + g.out_w, left + tw.first_offset + (nw - 1) * tw.offset_step + phase_w);
      ConvPass p;
      // 1x1, stride 1, no padding: one tap at offset 0, grad_output read as it is.
      p.nchw = reads_nchw_in_place(go, g);
      p.image = p.nchw ? go : place_nhwc(go, rows, cols, top, left, 1, 1);
      p.origin = p.nchw ? 0 : ((top + th.first_offset) * cols + left + tw.first_offset) * g.out_channels;
      p.out_h = phase_h;
      p.out_w = phase_w;
      p.dilation_h = th.offset_step;
      p.dilation_w = tw.offset_step;
      p.kernel_h = nh;
      p.kernel_w = nw;
      p.groups = g.groups;
      p.depth_channels = g.out_per_group();
      p.out_columns = g.in_per_group();
      // B[g][(t_h, t_w, co)][ci] = weight[g, co, ci, taps_h[t_h], taps_w[t_w]]
      const at::Tensor taps_h = at::tensor(th.taps, at::kLong), taps_w = at::tensor(tw.taps, at::kLong);
      p.packed = pad_columns(w.index_select(3, taps_h)
                                 .index_select(4, taps_w)
                                 .permute({0, 3, 4, 1, 2})
                                 .reshape({g.groups, -1, g.in_per_group()}));
      at::Tensor phase_grad = run_pass(p, channels_last);
      if (single_phase) return phase_grad;
      target.copy_(phase_grad);
    }
  }
  return grad_input;
}

// Whether grad-input goes through columns (ColumnsToImageArgs) instead of the stride
// phases, whose GEMM columns are a group's input channels: a few lanes of a vector for
// narrow groups, and, with a stride, one placed grad_output a phase. The columns (taps x
// channels a pixel) are written and read back, so at stride 1 they pay only where the
// phases' vectors would idle a third or more of their lanes (64-byte vectors: up to 10
// float or 5 double channels, or 9-10 double). Measured (2 threads, ratio to torch's
// grad-input, phases -> columns): the 7x7 stride-2 RGB stem 0.65x -> 2.12x (float64
// 0.43x -> 1.37x), 3x3 stride 2 C=8 0.93x -> 1.27x, C=16 0.97x -> 1.14x; stride 1, float:
// 3x3 C=3 0.74x -> 1.75x, C=8 0.73x -> 0.93x, 5x5 C=1 0.61x -> 2.67x, but 5x5 C=12
// 0.66x -> 0.54x and C=16 (whole vectors) 0.69x -> 0.60x; float64 3x3 C=3 0.57x -> 1.17x,
// 5x5 C=8 1.67x -> 1.14x. From 32 channels the phases were faster at stride 2 too (3x3:
// 0.84x -> 0.80x). Ungrouped only: a group's GEMM would have its few channels as depth
// (C=32 -> 64 in 32 groups: 1.06x -> 0.41x; C=128 in 32 groups 0.66x -> 0.34x), and
// depthwise layers have their channel-vectorized pass; 1x1 layers have one column a
// channel.
bool grad_input_by_columns(const Geometry& g, int64_t element_size) {
  if (g.groups > 1 || g.kernel_h * g.kernel_w == 1 || g.in_channels > 16) return false;
  if (g.stride_h > 1 || g.stride_w > 1) return true;
  const int64_t lanes = 64 / element_size, padded = round_up(g.in_channels, lanes);
  return 2 * padded >= 3 * g.in_channels;
}

// grad-input through columns (columns_pass). The result has the compute dtype, NCHW or
// channels_last as grad_output.
at::Tensor grad_input_columns(const at::Tensor& go, const at::Tensor& weight, const Geometry& g) {
  const bool channels_last = go.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return columns_pass(go, weight, g, /*forward=*/false, channels_last);
}

// grad-input of a 3x3, stride-1, undilated, ungrouped convolution with padding <= 2 is
// itself such a convolution: grad_output with the flipped, transposed weight and padding
// 2 - pad. Through Winograd when that one qualifies; else (or when a value came out
// non-finite) an undefined tensor, and the stride-phase passes run.
at::Tensor winograd_grad_input(const at::Tensor& go, const at::Tensor& weight, const Geometry& g) {
  Geometry t = g;
  t.in_channels = g.out_channels;
  t.out_channels = g.in_channels;
  t.height = g.out_h;
  t.width = g.out_w;
  t.out_h = g.height;
  t.out_w = g.width;
  t.pad_h = 2 - g.pad_h;
  t.pad_w = 2 - g.pad_w;
  if (g.pad_h > 2 || g.pad_w > 2 || !winograd_applies(t)) return at::Tensor();
  const bool channels_last = go.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return winograd_forward(go, winograd_weight(weight, /*for_grad_input=*/true), std::nullopt, t, false, channels_last);
}

at::Tensor conv2d_backward_input_cpu(const at::Tensor& grad_output, const at::Tensor& weight,
                                     at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = check_backward_input(grad_output, weight, input_size, stride, padding, dilation, groups);
  // An input without pixels (the padding alone gives the output its size) has no
  // phase to run; its gradient is empty.
  if (g.height == 0 || g.width == 0) return at::zeros(input_size, grad_output.options());
  const at::Tensor go = to_compute(grad_output);
  const at::Tensor w = to_compute(weight);
  at::Tensor grad_input = winograd_grad_input(go, w, g);
  if (!grad_input.defined() && grad_input_by_columns(g, go.element_size())) {
    // The columns pair each input pixel with the output pixels its taps reach and nothing
    // else: no zero padding met, no edge to recompute.
    return grad_input_columns(go, w, g).to(grad_output.scalar_type());
  }
  if (!grad_input.defined()) grad_input = grad_input_passes(go, w, g);
  // The passes multiply taps landing outside grad_output by zeros: exact unless a weight
  // is NaN or infinite. One reduction over the (small) weight decides; only then are the
  // edge pixels recomputed, skipping those taps as torch does (see EdgeGeometry).
  const EdgeGeometry edges = edge_geometry(g);
  if (edges.pixels() > 0 && g.batch > 0 && !all_finite(w)) {
    AT_DISPATCH_FLOATING_TYPES(go.scalar_type(), "conv2d_backward_input_edges",
                               [&] { recompute_edge_grad_input<scalar_t>(go, w, edges, grad_input); });
  }
  return grad_input.to(grad_output.scalar_type());
}


// How many chunks of `items` (output pixels, or Winograd tiles) a grad-weight pass
// reduces separately (their partial sums are then added in chunk order). A function of
// the shape only, never of the thread count: the result is then bitwise the same for
// any torch.set_num_threads. At least `min_items` a chunk, at most 32 chunks (enough
// tasks for 32 threads even for a single row block), and the partials (chunks x
// `weight_elements`) within `partials_budget` elements, so a large layer reduces in one
// chunk and the direct pass parallelizes over rows.
int64_t weight_grad_chunks(int64_t items, int64_t weight_elements, int64_t min_items = 256,
                           int64_t partials_budget = int64_t{1} << 22) {
  constexpr int64_t kMaxChunks = 32;
  const int64_t by_memory = partials_budget / std::max<int64_t>(1, weight_elements);
  return std::max<int64_t>(1, std::min({kMaxChunks, items / min_items, by_memory}));
}

// Depthwise grad-weight: chunks of output pixels, each reduced by the channel-vectorized
// kernel into [taps][C] partial sums, added in chunk order.
at::Tensor depthwise_weight_grad_cpu(const ConvPass& p, const at::Tensor& grad_output, const Geometry& g,
                                     at::IntArrayRef weight_size) {
  const int64_t pixels = g.batch * g.out_h * g.out_w, taps = g.kernel_h * g.kernel_w;
  const at::Tensor go = place_nhwc(grad_output, g.out_h, g.out_w, 0, 0, 1, 1);  // [pixels][C]
  const std::vector<int64_t> pixel_offs = pixel_offsets(p);
  const std::vector<int64_t> tap_offs = field_offsets(p);
  int64_t chunks = weight_grad_chunks(pixels, taps * g.out_channels);
  const int64_t chunk_pixels = (pixels + chunks - 1) / chunks;
  chunks = (pixels + chunk_pixels - 1) / chunk_pixels;
  at::Tensor partials = at::zeros({chunks, taps, g.out_channels}, go.options());
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  const int64_t elem = go.element_size();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t first = chunk * chunk_pixels;
      if (first >= pixels) continue;
      DepthwiseWeightGradArgs args;
      args.image = p.image.const_data_ptr();
      args.pixel_offsets = pixel_offs.data() + first;
      args.pixels = std::min(chunk_pixels, pixels - first);
      args.tap_offsets = tap_offs.data();
      args.taps = taps;
      args.grad = static_cast<const char*>(go.const_data_ptr()) + first * g.out_channels * elem;
      args.out = static_cast<char*>(partials.mutable_data_ptr()) + chunk * taps * g.out_channels * elem;
      args.channels = g.out_channels;
      args.dtype = go.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
      kernels.depthwise_weight_grad(args);
    }
  });
  // [kh, kw, C] -> [C, 1, kh, kw]
  return partials.sum(0).t().reshape(weight_size).contiguous();
}

// grad-weight of the layers winograd_applies to, through Winograd F(3x3, 2x2)
// (WinogradWeightGradArgs): chunks of tiles in parallel, added in chunk order (a function
// of the shape, as the direct pass's pixel chunks), then A^T M A per channel pair. An
// undefined tensor when a value came out non-finite: the direct pass then runs.
at::Tensor winograd_weight_grad(const at::Tensor& input, const at::Tensor& grad_output, const Geometry& g) {
  WinogradWeightGradArgs args;
  args.tiles_h = (g.out_h + 1) / 2;
  args.tiles_w = (g.out_w + 1) / 2;
  const int64_t K = g.out_channels, C = g.in_channels;
  args.input = place_args(input, 2 * args.tiles_h + 2, 2 * args.tiles_w + 2, g.pad_h, g.pad_w, 1, 1, C);
  args.grad = place_args(grad_output, 2 * args.tiles_h, 2 * args.tiles_w, 0, 0, 1, 1, K);
  args.tiles = g.batch * args.tiles_h * args.tiles_w;
  // Chunks are this pass's only parallelism. Their partials are 16/9 of the weight's
  // size each and are written and summed once per call: a 4M-element budget (32 chunks
  // of 16 MiB at B32 C64->128 32x32) page-faulted and summed its way to twice the time
  // of 8 chunks; 4 and 8 chunks ran the three benchmark layers alike on 2 threads.
  int64_t chunks = weight_grad_chunks(args.tiles, 16 * K * C, 512, int64_t{1} << 20);
  args.tiles_per_chunk = (args.tiles + chunks - 1) / chunks;
  chunks = (args.tiles + args.tiles_per_chunk - 1) / args.tiles_per_chunk;
  args.ldp = round_up(K, kColumnPad);
  at::Tensor partials = at::empty({chunks, 16, C, args.ldp}, input.options());
  args.channels = C;
  args.out_channels = K;
  args.partials = partials.mutable_data_ptr();
  args.dtype = input.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { kernels.winograd_weight_grad(args, begin, end); });
  at::Tensor grad_weight = at::empty({K, C, 3, 3}, input.options());
  std::atomic<bool> finite{true};
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "winograd_weight_grad", [&] {
    const scalar_t* sums = static_cast<const scalar_t*>(args.partials);
    scalar_t* out = grad_weight.mutable_data_ptr<scalar_t>();
    const int64_t ldp = args.ldp, padded = C * ldp;  // entry c ldp + k, k < K a channel pair
    constexpr int64_t kEntries = kColumnPad;              // a block within one channel c's row
    // Blocks of 16 entries: the chunks' partials added in chunk order into m, a cache line
    // of each of the 16 elements at a time (read a value at a time, the 16 elements of a
    // pair, C ldp apart, fell in one L1 set at C32 K64), then A^T M A.
    at::parallel_for(0, padded / kEntries, 16, [&](int64_t block_begin, int64_t block_end) {
      scalar_t m[16][kEntries];
      bool block_finite = true;
      for (int64_t block = block_begin; block < block_end; ++block) {
        const int64_t first = block * kEntries, c = first / ldp, k0 = first % ldp;
        const int64_t count = std::min(kEntries, K - k0);
        for (int e = 0; e < 16; ++e) {
          const scalar_t* src = sums + e * padded + first;
          for (int64_t j = 0; j < count; ++j) m[e][j] = src[j];
          for (int64_t chunk = 1; chunk < chunks; ++chunk) {
            src += 16 * padded;
            for (int64_t j = 0; j < count; ++j) m[e][j] += src[j];
          }
        }
        for (int64_t j = 0; j < count; ++j) {
          const int64_t kc = (k0 + j) * C + c;
          // A^T M A, A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1].
          scalar_t s[3][4];
          for (int q = 0; q < 4; ++q) {
            const scalar_t m0 = m[q][j], m1 = m[4 + q][j], m2 = m[8 + q][j], m3 = m[12 + q][j];
            s[0][q] = m0 + m1 + m2;
            s[1][q] = m1 - m2;
            s[2][q] = m1 + m2 + m3;
          }
          for (int i = 0; i < 3; ++i) {
            const scalar_t y[3] = {s[i][0] + s[i][1] + s[i][2], s[i][1] - s[i][2], s[i][1] + s[i][2] + s[i][3]};
            for (int col = 0; col < 3; ++col) {
              block_finite = block_finite && std::isfinite(y[col]);
              out[kc * 9 + 3 * i + col] = y[col];
            }
          }
        }
      }
      if (!block_finite) finite = false;
    });
  });
  return finite ? grad_weight : at::Tensor();
}

// grad-weight of an ungrouped layer with at most 6 output channels (NarrowWeightGradArgs):
// the output channels as the GEMM's rows instead of its columns. Not where the one-pass
// GEMM reads a 1x1 layer's NCHW input in place: the narrow pass's NHWC placement cost
// more than the idle lanes (1x1 C=64->3 64x64: 1.15x torch against 2.15x, C=128->4 0.80x
// against 1.88x; C=32->1 1.97x against 1.44x).
bool weight_grad_is_narrow(const Geometry& g, const at::Tensor& x) {
  return g.groups == 1 && g.out_channels <= 6 && !reads_nchw_in_place(x, g);
}

at::Tensor narrow_weight_grad_cpu(const at::Tensor& go, const at::Tensor& x, const Geometry& g,
                                  at::IntArrayRef weight_size) {
  const int64_t taps = g.kernel_h * g.kernel_w, K = g.out_channels, ldc = round_up(g.in_channels, kColumnPad);
  NarrowWeightGradArgs args;
  const at::Tensor image = place_nhwc(x, g.height + 2 * g.pad_h, g.width + 2 * g.pad_w, g.pad_h, g.pad_w, 1, 1, ldc);
  const at::Tensor grad = place_nhwc(go, g.out_h, g.out_w, 0, 0, 1, 1);
  args.image = image.const_data_ptr();
  args.rows = image.size(1);
  args.cols = image.size(2);
  args.ldc = ldc;
  args.grad = grad.const_data_ptr();
  args.out_channels = K;
  args.out_h = g.out_h;
  args.out_w = g.out_w;
  args.total_rows = g.batch * g.out_h;
  args.kernel_h = g.kernel_h;
  args.kernel_w = g.kernel_w;
  args.stride_h = g.stride_h;
  args.stride_w = g.stride_w;
  args.dilation_h = g.dilation_h;
  args.dilation_w = g.dilation_w;
  args.dtype = x.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  // Chunks of output rows (a function of the shape: the same sums for any thread count).
  const int64_t min_rows = std::max<int64_t>(1, 256 / std::max<int64_t>(1, g.out_w));
  int64_t chunks = weight_grad_chunks(args.total_rows, taps * K * ldc, min_rows);
  args.chunk_rows = std::max<int64_t>(1, (args.total_rows + chunks - 1) / chunks);
  chunks = std::max<int64_t>(1, (args.total_rows + args.chunk_rows - 1) / args.chunk_rows);
  at::Tensor partials = at::zeros({chunks, g.kernel_h, g.kernel_w, K, ldc}, x.options());
  args.partials = partials.mutable_data_ptr();
  if (args.total_rows > 0 && g.out_w > 0) {
    const CpuKernels& kernels = conv2d_cpu_kernels_select();
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) { kernels.narrow_weight_grad(args, begin, end); });
  }
  // [kh, kw, co, ci] -> [co, ci, kh, kw]
  return partials.sum(0).narrow(3, 0, g.in_channels).permute({2, 3, 0, 1}).reshape(weight_size).contiguous();
}

at::Tensor conv2d_backward_weight_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                      at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                      at::IntArrayRef dilation, int64_t groups) {
  const Geometry g = check_backward_weight(grad_output, input, weight_size, stride, padding, dilation, groups);
  const int64_t field = g.kernel_h * g.kernel_w * g.in_per_group();
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  at::Tensor x = to_compute(input);
  if (winograd_applies(g)) {
    const at::Tensor grad_weight = winograd_weight_grad(x, to_compute(grad_output), g);
    if (grad_weight.defined()) return grad_weight.to(input.scalar_type());
  }
  if (weight_grad_is_narrow(g, x)) {
    return narrow_weight_grad_cpu(to_compute(grad_output), x, g, weight_size).to(input.scalar_type());
  }
  const ConvPass p = input_pass(x, g);
  if (g.in_per_group() == 1 && g.out_per_group() == 1 && g.groups > 1 && pixels > 0) {
    return depthwise_weight_grad_cpu(p, to_compute(grad_output), g, weight_size).to(input.scalar_type());
  }
  // grad_output as B: [G, pixels, pad(C_out/G)]
  at::Tensor packed_go;
  if (g.groups == 1) {
    packed_go = place_nhwc(to_compute(grad_output), g.out_h, g.out_w, 0, 0, 1, 1, round_up(g.out_channels, kColumnPad))
                    .reshape({1, pixels, round_up(g.out_channels, kColumnPad)});
  } else {
    at::Tensor go = to_compute(grad_output).permute({0, 2, 3, 1}).reshape({pixels, g.groups, g.out_per_group()});
    packed_go = pad_columns(go.permute({1, 0, 2}));
  }
  const int64_t row_block = rows_per_task(field, g.groups);
  const int64_t row_blocks = (field + row_block - 1) / row_block;
  int64_t chunks = weight_grad_chunks(pixels, g.groups * field * g.out_per_group());
  const int64_t chunk_pixels = (pixels + chunks - 1) / chunks;
  chunks = pixels == 0 ? 1 : (pixels + chunk_pixels - 1) / chunk_pixels;
  // [chunks, G, field, C_out/G]: partial sums over chunks of output pixels
  // Every element is written by its chunk's GEMM (its first depth block stores), so only
  // an empty reduction (no pixels) needs the zeros.
  at::Tensor partials = pixels > 0 ? at::empty({chunks, g.groups, field, g.out_per_group()}, x.options())
                                   : at::zeros({chunks, g.groups, field, g.out_per_group()}, x.options());
  if (pixels > 0 && partials.numel() > 0) {
    const std::vector<int64_t> pixel_offs = pixel_offsets(p);  // depth of this GEMM
    const std::vector<int64_t> field_offs = field_offsets(p);  // rows of this GEMM
    const int64_t elem = x.element_size();
    const CpuKernels& kernels = conv2d_cpu_kernels_select();
    const int64_t tasks = chunks * g.groups * row_blocks;
    at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task / (g.groups * row_blocks);
        const int64_t group = (task / row_blocks) % g.groups;
        const int64_t row_begin = (task % row_blocks) * row_block;
        const int64_t pixel_begin = chunk * chunk_pixels;
        OffsetGemmArgs args;
        args.a = static_cast<const char*>(p.image.const_data_ptr()) + group * g.in_per_group() * elem;
        args.row_offsets = field_offs.data();
        args.depth_offsets = pixel_offs.data() + pixel_begin;
        args.depth = std::min(chunk_pixels, pixels - pixel_begin);
        args.ldb = packed_go.size(2);
        args.b = static_cast<const char*>(packed_go.const_data_ptr()) +
                 (group * pixels + pixel_begin) * args.ldb * elem;
        args.ldc = g.out_per_group();
        args.c = static_cast<char*>(partials.mutable_data_ptr()) + (chunk * g.groups + group) * field * args.ldc * elem;
        args.columns = g.out_per_group();
        args.dtype = x.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
        kernels.offset_gemm(args, row_begin, std::min(field, row_begin + row_block));
      }
    });
  }
  // [G, kh, kw, ci, co] -> [G, co, ci, kh, kw]
  at::Tensor sum = partials.sum(0).reshape({g.groups, g.kernel_h, g.kernel_w, g.in_per_group(), g.out_per_group()});
  return sum.permute({0, 4, 3, 1, 2}).reshape(weight_size).contiguous().to(input.scalar_type());
}

at::Tensor conv2d_backward_bias_cpu(const at::Tensor& grad_output) {
  const char* op = "conv2d_backward_bias";
  kernel_dtype(grad_output, op, "grad_output");
  TORCH_CHECK(grad_output.dim() == 4, op, ": expected a 4-D grad_output, got shape ", grad_output.sizes());
  return to_compute(grad_output).sum({0, 2, 3}).to(grad_output.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_max_pool2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                              const std::optional<at::Tensor>& bias,
                                                              at::IntArrayRef stride, at::IntArrayRef padding,
                                                              at::IntArrayRef dilation, int64_t groups) {
  const char* op = "conv2d_relu_max_pool2d";
  const Geometry g = check_forward(op, input, weight, bias, stride, padding, dilation, groups);
  TORCH_CHECK(g.out_h >= 2 && g.out_w >= 2, op, ": the convolution output (", g.out_h, " x ", g.out_w,
              ") is smaller than the 2x2 pooling window");
  const bool channels_last = wants_channels_last(input, weight);
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(to_compute(*bias)) : std::nullopt;
  ConvPass p = forward_pass(to_compute(input), to_compute(weight), b, g, /*relu=*/true);
  const int64_t pooled_h = g.out_h / 2, pooled_w = g.out_w / 2;
  const int64_t windows = g.batch * pooled_h * pooled_w;
  at::Tensor pooled = at::empty({g.batch, pooled_h, pooled_w, g.out_channels}, p.image.options());
  at::Tensor argmax = at::empty({g.batch, pooled_h, pooled_w, g.out_channels}, p.image.options().dtype(at::kByte));
  if (windows > 0 && g.out_channels > 0) {
    // Row 4w + q is pixel (2 ph + q / 2, 2 pw + q % 2) of window w = (n, ph, pw).
    const ImageSteps step = image_steps(p);
    std::vector<int64_t> row_offsets(size_t(4 * windows));
    int64_t* o = row_offsets.data();
    for (int64_t n = 0; n < g.batch; ++n)
      for (int64_t ph = 0; ph < pooled_h; ++ph)
        for (int64_t pw = 0; pw < pooled_w; ++pw)
          for (int64_t q = 0; q < 4; ++q)
            *o++ = n * step.image + (2 * ph + q / 2) * g.stride_h * step.row + (2 * pw + q % 2) * g.stride_w * step.col;
    const std::vector<int64_t> depth_offsets = field_offsets(p);
    const int64_t block = rows_per_task(4 * windows, 1);  // a multiple of 4: whole windows
    const int64_t blocks = (4 * windows + block - 1) / block;
    const CpuKernels& kernels = conv2d_cpu_kernels_select();
    const int64_t elem = p.image.element_size();
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      std::vector<char> scratch(size_t(block * g.out_channels * elem));
      for (int64_t task = begin; task < end; ++task) {
        const int64_t row_begin = task * block, row_end = std::min(4 * windows, row_begin + block);
        // The scratch block holds rows [row_begin, row_end) at row index r - row_begin.
        for (int64_t group = 0; group < g.groups; ++group) {
          OffsetGemmArgs args = gemm_args(p, row_offsets.data() + row_begin, depth_offsets.data(), group,
                                          scratch.data(), g.out_channels);
          kernels.offset_gemm(args, 0, row_end - row_begin);
        }
        PoolArgs pool;
        pool.conv = scratch.data();
        pool.ldc = g.out_channels;
        pool.columns = g.out_channels;
        pool.pooled = static_cast<char*>(pooled.mutable_data_ptr()) + (row_begin / 4) * g.out_channels * elem;
        pool.argmax = argmax.mutable_data_ptr<uint8_t>() + (row_begin / 4) * g.out_channels;
        pool.dtype = p.image.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
        kernels.max_pool_2x2(pool, 0, (row_end - row_begin) / 4);
      }
    });
  }
  return {from_nhwc(pooled, channels_last).to(input.scalar_type()), from_nhwc(argmax, channels_last)};
}

// grad_conv (NHWC, dense) from the pooled gradient, output and argmax (any strides):
// each conv pixel takes its window's gradient if it is the window's argmax and the
// pooled output is not <= 0 (threshold_backward's rule), else 0; the kernel
// (UnpoolArgs, conv2d_cpu_kernel.cpp) writes each window row's conv rows once.
void unpool_relu(const at::Tensor& grad, const at::Tensor& pooled, const at::Tensor& argmax, at::Tensor& grad_conv) {
  UnpoolArgs args;
  args.grad = grad.const_data_ptr();
  args.pooled = pooled.const_data_ptr();
  args.argmax = argmax.const_data_ptr<uint8_t>();
  for (int d = 0; d < 4; ++d) {
    args.grad_stride[d] = grad.stride(d);
    args.pooled_stride[d] = pooled.stride(d);
    args.argmax_stride[d] = argmax.stride(d);
  }
  args.channels = grad_conv.size(3);
  args.pooled_h = pooled.size(2);
  args.pooled_w = pooled.size(3);
  args.conv_h = grad_conv.size(1);
  args.conv_w = grad_conv.size(2);
  args.out = grad_conv.mutable_data_ptr();
  args.dtype = grad.scalar_type() == at::kDouble ? DType::kFloat64 : DType::kFloat32;
  const int64_t tasks = grad_conv.size(0) * std::max<int64_t>(args.pooled_h, 1);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, 2 * args.conv_w * args.channels));
  const CpuKernels& kernels = conv2d_cpu_kernels_select();
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) { kernels.unpool_relu(args, begin, end); });
}

at::Tensor conv2d_relu_max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& output,
                                               const at::Tensor& argmax, at::IntArrayRef conv_size) {
  const char* op = "conv2d_relu_max_pool2d_backward";
  kernel_dtype(output, op, "output");
  check_same(op, output, "grad_output", grad_output);
  TORCH_CHECK(conv_size.size() == 4, op, ": conv_size must have 4 elements, got ", conv_size);
  TORCH_CHECK(std::all_of(conv_size.begin(), conv_size.end(), [](int64_t s) { return s >= 0; }), op,
              ": conv_size must be non-negative, got ", conv_size);
  TORCH_CHECK(output.dim() == 4 && output.size(0) == conv_size[0] && output.size(1) == conv_size[1] &&
                  output.size(2) == conv_size[2] / 2 && output.size(3) == conv_size[3] / 2,
              op, ": output of shape ", output.sizes(), " is not the 2x2 pooling of ", conv_size);
  TORCH_CHECK(grad_output.sizes() == output.sizes(), op, ": grad_output has shape ", grad_output.sizes(),
              " but output has shape ", output.sizes());
  TORCH_CHECK(argmax.sizes() == output.sizes() && argmax.scalar_type() == at::kByte, op,
              ": argmax must be uint8 of shape ", output.sizes(), ", got ", argmax.scalar_type(), " ",
              argmax.sizes());
  // A window position outside 0..3 would drop the window's gradient silently; one uint8
  // reduction over the pooled tensor, small next to the backward.
  TORCH_CHECK_VALUE(argmax.numel() == 0 || argmax.max().item<uint8_t>() <= 3, op,
                    ": argmax holds 2x2 window positions 0..3, got a ", int(argmax.max().item<uint8_t>()));
  at::Tensor g = to_compute(grad_output);
  at::Tensor y = to_compute(output);
  at::Tensor grad_conv = at::empty({conv_size[0], conv_size[2], conv_size[3], conv_size[1]}, g.options());
  unpool_relu(g, y, argmax, grad_conv);
  return from_nhwc(grad_conv, true).to(grad_output.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("conv2d", &conv2d_cpu);
  m.impl("conv2d_backward_input", &conv2d_backward_input_cpu);
  m.impl("conv2d_backward_weight", &conv2d_backward_weight_cpu);
  m.impl("conv2d_backward_bias", &conv2d_backward_bias_cpu);
  m.impl("conv2d_relu_max_pool2d", &conv2d_relu_max_pool2d_cpu);
  m.impl("conv2d_relu_max_pool2d_backward", &conv2d_relu_max_pool2d_backward_cpu);
}

}  // namespace fastlayers::conv2d

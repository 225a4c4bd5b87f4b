// conv2d CPU kernels: the offset-GEMM micro-kernel and the 2x2 max-pool epilogue.
// Compiled once per ISA into namespace fastlayers::FL_CPU_NS; parallelism lives in
// the caller (at::parallel_for over row blocks in conv2d.cpp).
//
// Why this design: a convolution is a GEMM whose A operand (im2col of the input) is
// KH*KW times larger than the input. Materializing it costs memory traffic that an
// FMA-bound kernel cannot afford, so A is read in place through offset tables (see
// conv2d_kernel.h). The micro-kernel keeps an R x V register tile of C (R rows,
// V vectors of output channels; 24 of the 32 zmm registers at AVX-512): per depth step
// it loads V vectors of B and broadcasts R scalars of A, R*V FMAs for R+V loads, which
// keeps the two FMA pipes busy. The depth loop is blocked so that the B panel of one
// block (kDepthBlock x V vectors) stays in L1 while every row tile of the caller's
// block streams past it. GCC vector extensions give the ISA's full width (zmm, ymm,
// xmm) from one source.
#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "bias_act/bias_act_math.h"
#include "common/cpu_scalar.h"
#include "common/cpu_transpose.h"
#include "conv2d/conv2d_kernel.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using conv2d::ColumnsToImageArgs;
using conv2d::NarrowWeightGradArgs;
using conv2d::OffsetGemmArgs;
using conv2d::DepthwiseArgs;
using conv2d::DepthwiseWeightGradArgs;
using conv2d::PlaceArgs;
using conv2d::PoolArgs;
using conv2d::StoreNchwArgs;
using conv2d::UnpoolArgs;
using conv2d::WinogradArgs;
using conv2d::WinogradWeightGradArgs;

#if defined(FL_CPU_ISA_avx512)
constexpr int kVecBytes = 64;
constexpr int kMaxVectors = 4;  // 32 vector registers: up to 24 accumulators
#elif defined(FL_CPU_ISA_avx2)
constexpr int kVecBytes = 32;
constexpr int kMaxVectors = 2;  // 16 vector registers: up to 12 accumulators
#else
constexpr int kVecBytes = 16;
constexpr int kMaxVectors = 2;
#endif

typedef float VecF __attribute__((vector_size(kVecBytes)));
typedef double VecD __attribute__((vector_size(kVecBytes)));
template <class T> struct VecOf;
template <> struct VecOf<float> { using type = VecF; };
template <> struct VecOf<double> { using type = VecD; };

// Rows per register tile for V vectors: R * V accumulators + V B vectors + 1 broadcast
// fit the register file; more rows than 12 would spill the row pointers.
constexpr int max_rows(int vectors) {
  if (kMaxVectors == 4) return vectors == 4 ? 6 : vectors == 3 ? 8 : 12;
  return vectors == 2 ? 6 : 12;
}
constexpr int kMaxRows = 12;

template <class T>
FL_INLINE typename VecOf<T>::type load_vec(const T* p) {
  typename VecOf<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class T>
FL_INLINE void store_vec(T* p, typename VecOf<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

// Lanes [0, count) of a vector (0 < count <= W), masked (cpu::load_bytes).
template <class T>
FL_INLINE typename VecOf<T>::type load_lanes(const T* p, int count) {
  return cpu::load_bytes<typename VecOf<T>::type>(p, count * static_cast<int>(sizeof(T)));
}

template <class T>
FL_INLINE void store_lanes(T* p, typename VecOf<T>::type v, int count) {
  cpu::store_bytes(p, v, count * static_cast<int>(sizeof(T)));
}

struct TileArgs {
  const void* a;
  const int64_t* row_offsets;  // R entries
  const int64_t* depth_offsets;
  int64_t depth;
  const void* b;  // already offset to the tile's first column
  int64_t ldb;
  void* c;  // already offset to the tile's first row and column
  int64_t ldc;
  int64_t valid_columns;  // of this tile's V * W columns
  bool accumulate;        // C += (else C =)
  const void* bias;       // null unless this is the last depth block; padded, offset
  bool relu;              // only on the last depth block
};

// One depth step of an R x V-vector register tile: acc[r][v] += a_at(r) * B's row.
template <class T, int R, int V, class AAt>
FL_INLINE void tile_step(typename VecOf<T>::type (&acc)[R][V], const T* b_row, const AAt& a_at) {
  using Vec = typename VecOf<T>::type;
  constexpr int W = kVecBytes / sizeof(T);
  Vec bv[V];
#pragma GCC unroll 4
  for (int v = 0; v < V; ++v) bv[v] = load_vec(b_row + v * W);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    const T s = a_at(r);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] += s * bv[v];
  }
}

template <class T, int R, int V>
void tile_kernel(const TileArgs& t) {
  using Vec = typename VecOf<T>::type;
  constexpr int W = kVecBytes / sizeof(T);
  const T* a = static_cast<const T*>(t.a);
  const T* b = static_cast<const T*>(t.b);
  T* c = static_cast<T*>(t.c);

  Vec acc[R][V];
  const T* a_rows[R];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    a_rows[r] = a + t.row_offsets[r];
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  }
  const int64_t depth = t.depth;
  const int64_t ldb = t.ldb;
  const int64_t* depth_offsets = t.depth_offsets;
  for (int64_t k = 0; k < depth; ++k) {
    const int64_t offset = depth_offsets[k];
    tile_step<T, R, V>(acc, b + k * ldb, [&](int r) { return a_rows[r][offset]; });
  }

  Vec bias[V] = {};
  if (t.bias) {
    const T* bias_ptr = static_cast<const T*>(t.bias);
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) bias[v] = load_vec(bias_ptr + v * W);
  }
  const Vec zero = Vec{};
  for (int r = 0; r < R; ++r) {
    T* c_row = c + r * t.ldc;
    if (t.valid_columns == V * W) {
#pragma GCC unroll 4
      for (int v = 0; v < V; ++v) {
        Vec x = acc[r][v];
        if (t.accumulate) x += load_vec(c_row + v * W);
        if (t.bias) x += bias[v];
        // bias_act's ReLU (activation_forward<kRelu>) on a vector: NaN < 0 is false, NaN is kept.
        if (t.relu) x = x < zero ? zero : x;
        store_vec(c_row + v * W, x);
      }
    } else {  // the last column tile: only valid_columns of the V * W lanes exist in C
      for (int v = 0; v < V; ++v) {
        const int lanes = static_cast<int>(std::min<int64_t>(W, t.valid_columns - v * W));
        if (lanes <= 0) break;
        Vec x = acc[r][v];
        if (t.accumulate) x += lanes == W ? load_vec(c_row + v * W) : load_lanes(c_row + v * W, lanes);
        if (t.bias) x += bias[v];
        if (t.relu) x = x < zero ? zero : x;
        if (lanes == W) {
          store_vec(c_row + v * W, x);
        } else {
          store_lanes(c_row + v * W, x, lanes);
        }
      }
    }
  }
}

using TileFn = void (*)(const TileArgs&);

template <class T, int V, size_t... Rs>
constexpr std::array<TileFn, kMaxRows> tile_row_table(std::index_sequence<Rs...>) {
  return {&tile_kernel<T, int(Rs) + 1, V>...};
}

template <class T, size_t... Vs>
constexpr std::array<std::array<TileFn, kMaxRows>, kMaxVectors> tile_table(std::index_sequence<Vs...>) {
  return {tile_row_table<T, int(Vs) + 1>(std::make_index_sequence<kMaxRows>{})...};
}

// kTiles<T>[V - 1][R - 1] = tile_kernel<T, R, V>. Entries with R > max_rows(V) exist
// but are never called.
template <class T>
constexpr auto kTiles = tile_table<T>(std::make_index_sequence<kMaxVectors>{});

// Depth rows of B a GEMM call takes at a time: the panel of one block, kDepthBlock x
// (kMaxVectors * W), is 32 KiB and stays in L1 while the call's row tiles stream past it.
constexpr int64_t kDepthBlock = (32 * 1024) / (kMaxVectors * kVecBytes);

// Rows of the next register tile with `left` rows to go: a short remainder shares the
// last full tile's rows (6 + 2 -> 4 + 4), as a 2-row tile has too few accumulators to
// keep the FMA pipes busy. (Rows spread evenly over the fewest tiles, 32 as 6 6 5 5 5 5
// instead of 6 6 6 6 4 4, measured the same.)
inline int64_t tile_rows(int64_t left, int64_t rows_per_tile) {
  return left > rows_per_tile && left < rows_per_tile + rows_per_tile / 2 ? (left + 1) / 2
                                                                           : std::min(rows_per_tile, left);
}

template <class T>
void offset_gemm_typed(const OffsetGemmArgs& args, int64_t row_begin, int64_t row_end) {
  constexpr int W = kVecBytes / sizeof(T);
  const T* a = static_cast<const T*>(args.a);
  const T* b = static_cast<const T*>(args.b);
  const T* bias = static_cast<const T*>(args.bias);
  T* c = static_cast<T*>(args.c);
  for (int64_t col = 0; col < args.columns; col += kMaxVectors * W) {
    const int64_t tile_columns = std::min<int64_t>(kMaxVectors * W, args.columns - col);
    const int vectors = int((tile_columns + W - 1) / W);
    const int64_t rows_per_tile = max_rows(vectors);
    int64_t depth_begin = 0;
    do {  // runs once when depth == 0: C = bias (or 0)
      const int64_t depth = std::min(kDepthBlock, args.depth - depth_begin);
      const bool last = depth_begin + depth == args.depth;
      for (int64_t row = row_begin, rows = 0; row < row_end; row += rows) {
        rows = tile_rows(row_end - row, rows_per_tile);
        TileArgs t;
        t.a = a;
        t.row_offsets = args.row_offsets + row;
        t.depth_offsets = args.depth_offsets + depth_begin;
        t.depth = depth;
        t.b = b + depth_begin * args.ldb + col;
        t.ldb = args.ldb;
        t.c = c + row * args.ldc + col;
        t.ldc = args.ldc;
        t.valid_columns = tile_columns;
        t.accumulate = args.accumulate || depth_begin > 0;
        t.bias = last && bias ? bias + col : nullptr;
        t.relu = last && args.relu;
        kTiles<T>[vectors - 1][static_cast<int>(rows) - 1](t);
      }
      depth_begin += depth;
    } while (depth_begin < args.depth);
  }
}

void offset_gemm(const OffsetGemmArgs& args, int64_t row_begin, int64_t row_end) {
  if (args.dtype == DType::kFloat64) {
    offset_gemm_typed<double>(args, row_begin, row_end);
  } else {
    offset_gemm_typed<float>(args, row_begin, row_end);
  }
}

// One register tile of a dense GEMM: C[R rows x V vectors] (= or +=) A B, A's element
// (r, k) at a[r * a_row + k * a_depth], B's row k at b + k * ldb.
template <class T, int R, int V>
void dense_tile(const T* a, int64_t a_row, int64_t a_depth, const T* b, int64_t ldb, int64_t depth, T* c, int64_t ldc,
                bool accumulate) {
  using Vec = typename VecOf<T>::type;
  constexpr int W = kVecBytes / sizeof(T);
  Vec acc[R][V];
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) acc[r][v] = Vec{};
  }
  for (int64_t k = 0; k < depth; ++k) {
    tile_step<T, R, V>(acc, b + k * ldb, [&](int r) { return a[r * a_row + k * a_depth]; });
  }
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 4
    for (int v = 0; v < V; ++v) {
      T* out = c + r * ldc + v * W;
      store_vec(out, accumulate ? acc[r][v] + load_vec(out) : acc[r][v]);
    }
  }
}

template <class T>
using DenseTileOf = void (*)(const T*, int64_t, int64_t, const T*, int64_t, int64_t, T*, int64_t, bool);

template <class T, int V, size_t... Rs>
constexpr std::array<DenseTileOf<T>, kMaxRows> dense_row_table(std::index_sequence<Rs...>) {
  return {&dense_tile<T, int(Rs) + 1, V>...};
}

template <class T, size_t... Vs>
constexpr std::array<std::array<DenseTileOf<T>, kMaxRows>, kMaxVectors> dense_table(std::index_sequence<Vs...>) {
  return {dense_row_table<T, int(Vs) + 1>(std::make_index_sequence<kMaxRows>{})...};
}

// kDenseTiles<T>[V - 1][R - 1] = dense_tile<T, R, V>, as kTiles.
template <class T>
constexpr auto kDenseTiles = dense_table<T>(std::make_index_sequence<kMaxVectors>{});

// C (= or += with `accumulate`) A B, dense: A [rows x depth] (element (r, k) at
// a[r * a_row + k * a_depth]), B [depth x columns] (row stride ldb), C row stride ldc;
// `columns` a multiple of the vector width (the Winograd operands' zero-padded widths).
// The Winograd forward's 16 GEMMs have depth C (32 at the 16x16 layer, 384 cycles of
// FMAs a 6 x 4-vector tile): through the offset GEMM, whose tiles carry offset tables,
// partial columns, bias and ReLU, they ran at ~76% of the FMA peak, here at ~90%.
template <class T>
void dense_gemm(const T* a, int64_t a_row, int64_t a_depth, int64_t rows, const T* b, int64_t ldb, int64_t depth,
                int64_t columns, T* c, int64_t ldc, bool accumulate) {
  constexpr int W = kVecBytes / sizeof(T);
  for (int64_t col = 0; col < columns; col += kMaxVectors * W) {
    const int vectors = int(std::min<int64_t>(kMaxVectors, (columns - col) / W));
    const int64_t rows_per_tile = max_rows(vectors);
    for (int64_t depth_begin = 0; depth_begin < depth; depth_begin += kDepthBlock) {
      const int64_t block = std::min(kDepthBlock, depth - depth_begin);
      for (int64_t row = 0, n = 0; row < rows; row += n) {
        n = tile_rows(rows - row, rows_per_tile);
        kDenseTiles<T>[vectors - 1][n - 1](a + row * a_row + depth_begin * a_depth, a_row, a_depth,
                                            b + depth_begin * ldb + col, ldb, block, c + row * ldc + col, ldc,
                                            accumulate || depth_begin > 0);
      }
    }
  }
}

template <class T>
void max_pool_2x2_typed(const PoolArgs& args, int64_t window_begin, int64_t window_end) {
  const T* conv = static_cast<const T*>(args.conv);
  T* pooled = static_cast<T*>(args.pooled);
  const int64_t columns = args.columns;
  for (int64_t w = window_begin; w < window_end; ++w) {
    const T* p0 = conv + (4 * w) * args.ldc;
    const T* p1 = p0 + args.ldc;
    const T* p2 = p1 + args.ldc;
    const T* p3 = p2 + args.ldc;
    T* out = pooled + w * columns;
    uint8_t* index = args.argmax + w * columns;
#pragma omp simd
    for (int64_t j = 0; j < columns; ++j) {
      // torch's rule, scanning the window in order: take v if v > max or v is NaN.
      T m = p0[j];
      uint8_t at = 0;
      T v = p1[j];
      bool take = v > m || v != v;
      m = take ? v : m;
      at = take ? 1 : at;
      v = p2[j];
      take = v > m || v != v;
      m = take ? v : m;
      at = take ? 2 : at;
      v = p3[j];
      take = v > m || v != v;
      m = take ? v : m;
      at = take ? 3 : at;
      out[j] = m;
      index[j] = at;
    }
  }
}

void max_pool_2x2(const PoolArgs& args, int64_t window_begin, int64_t window_end) {
  if (args.dtype == DType::kFloat64) {
    max_pool_2x2_typed<double>(args, window_begin, window_end);
  } else {
    max_pool_2x2_typed<float>(args, window_begin, window_end);
  }
}

// ---- layout passes: NCHW <-> NHWC --------------------------------------------------------
//
// Both are transposes of [channels x pixels] blocks. Element by element they were ~1/6
// of an NCHW convolution's time (one scalar load and store an element, the loads
// strided); with AVX-512 a 16 x 16 float block moves as 16 vector loads, 64 shuffles
// and 16 vector stores (transpose_block, common/cpu_transpose.h).

// Row `row` of image n of the placed image (PlaceArgs) into out[cols * dst_channels].
template <class T>
void place_row(const PlaceArgs& args, int64_t n, int64_t row, T* out) {
  const T* src = static_cast<const T*>(args.src);
  // Channels a sweep handles: their source rows stay in L1 while the columns advance.
  constexpr int64_t kChannelChunk = 16;
  std::memset(out, 0, size_t(args.cols * args.dst_channels) * sizeof(T));
  const int64_t di = row - args.top;
  if (di < 0 || di % args.step_h != 0 || di / args.step_h >= args.height) return;
  const T* in = src + n * args.src_stride[0] + (di / args.step_h) * args.src_stride[2];
  const int64_t first_j = args.left >= 0 ? 0 : (-args.left + args.step_w - 1) / args.step_w;
  int64_t end_j = args.left >= args.cols ? 0 : (args.cols - 1 - args.left) / args.step_w + 1;
  end_j = std::min(end_j, args.width);
  if (args.src_stride[1] == 1) {  // channels contiguous (channels_last): copy pixel by pixel
    for (int64_t j = first_j; j < end_j; ++j) {
      std::memcpy(out + (args.left + j * args.step_w) * args.dst_channels, in + j * args.src_stride[3],
                  size_t(args.channels) * sizeof(T));
    }
    return;
  }
  if (args.src_stride[3] == 1 && end_j > first_j) {  // NCHW rows: [channels x columns] -> [columns x channels]
    transpose_block(in + first_j, args.src_stride[1], args.channels, end_j - first_j,
                    out + (args.left + first_j * args.step_w) * args.dst_channels, args.step_w * args.dst_channels);
    return;
  }
  for (int64_t c0 = 0; c0 < args.channels; c0 += kChannelChunk) {
    const int64_t c1 = std::min(args.channels, c0 + kChannelChunk);
    for (int64_t j = first_j; j < end_j; ++j) {
      T* o = out + (args.left + j * args.step_w) * args.dst_channels;
      const T* i = in + j * args.src_stride[3];
      for (int64_t c = c0; c < c1; ++c) o[c] = i[c * args.src_stride[1]];
    }
  }
}

template <class T>
void place_image_typed(const PlaceArgs& args, int64_t row_begin, int64_t row_end) {
  T* dst = static_cast<T*>(args.dst);
  const int64_t row_len = args.cols * args.dst_channels;
  for (int64_t image_row = row_begin; image_row < row_end; ++image_row) {
    place_row(args, image_row / args.rows, image_row % args.rows, dst + image_row * row_len);
  }
}

void place_image(const PlaceArgs& args, int64_t row_begin, int64_t row_end) {
  if (args.dtype == DType::kFloat64) {
    place_image_typed<double>(args, row_begin, row_end);
  } else {
    place_image_typed<float>(args, row_begin, row_end);
  }
}

// A window of rows [first, end) of one image of a placed image (PlaceArgs), kept in a
// buffer of up to `max_rows` rows: the Winograd passes place the rows they are about to
// transform rather than the whole batch beforehand, so the rows stay in L1/L2 between
// their placement and the transform and no batch-sized image goes through L3 and back.
// Rows the previous window of the same image already holds are moved up, not placed again.
template <class T>
class PlacedRows {
 public:
  PlacedRows(const PlaceArgs& args, int64_t max_rows)
      : args_(args), row_len_(args.cols * args.dst_channels), rows_(static_cast<size_t>(max_rows * row_len_)) {}

  // Row `first` of image n at the returned pointer, the next ones row_len() apart.
  const T* place(int64_t n, int64_t first, int64_t end) {
    if (n == n_ && first == first_ && end == end_) return rows_.data();
    int64_t from = first;
    if (n == n_ && first_ <= first && first < end_) {
      std::memmove(rows_.data(), rows_.data() + (first - first_) * row_len_,
                   size_t((end_ - first) * row_len_) * sizeof(T));
      from = end_;
    }
    for (int64_t r = from; r < end; ++r) place_row(args_, n, r, rows_.data() + (r - first) * row_len_);
    n_ = n, first_ = first, end_ = end;
    return rows_.data();
  }
  int64_t row_len() const { return row_len_; }

 private:
  const PlaceArgs& args_;
  int64_t row_len_;
  std::vector<T> rows_;
  int64_t n_ = -1, first_ = 0, end_ = 0;
};

template <class T>
void store_nchw_typed(const StoreNchwArgs& args, int64_t row_begin, int64_t row_end) {
  const T* block = static_cast<const T*>(args.block);
  T* dst = static_cast<T*>(args.dst);
  // Split [row_begin, row_end) where it crosses an image: within one image, channel c
  // of consecutive pixels is contiguous in the destination.
  int64_t r = row_begin;
  while (r < row_end) {
    const int64_t pixel = args.first_pixel + r;
    const int64_t n = pixel / args.plane, hw = pixel % args.plane;
    const int64_t count = std::min(row_end - r, args.plane - hw);
    T* out = dst + n * args.columns * args.plane + hw;
    const T* in = block + r * args.ldc;
    transpose_block(in, args.ldc, count, args.columns, out, args.plane);  // [pixels x channels] -> [channels x pixels]
    r += count;
  }
}

void store_nchw(const StoreNchwArgs& args, int64_t row_begin, int64_t row_end) {
  if (args.dtype == DType::kFloat64) {
    store_nchw_typed<double>(args, row_begin, row_end);
  } else {
    store_nchw_typed<float>(args, row_begin, row_end);
  }
}

// One task: the conv rows of pooled row ph of image n. Every conv element of those rows
// is written once (no separate fill). Channels contiguous in the sources (channels_last):
// vectorized along them. Pooled rows contiguous (NCHW): per chunk of 16 channels the
// four window positions' values are formed as [channel][pw] planes, vectorized along
// pw, then transposed into the NHWC rows (transpose_block; AVX-512 for float). The
// element-by-element scatter this replaces was ~1/6 of the seed CNN's train step.
template <class T>
void unpool_relu_typed(const UnpoolArgs& args, int64_t task_begin, int64_t task_end) {
  const T* grad = static_cast<const T*>(args.grad);
  const T* pooled = static_cast<const T*>(args.pooled);
  T* out = static_cast<T*>(args.out);
  const int64_t C = args.channels, PH = args.pooled_h, PW = args.pooled_w;
  const int64_t row_len = args.conv_w * C;
  const int64_t window_rows = std::max<int64_t>(PH, 1);
  const int64_t* gs = args.grad_stride;
  const int64_t* ys = args.pooled_stride;
  const int64_t* is = args.argmax_stride;
  // The pooled output and argmax share the input's layout; the gradient may have
  // another (the next layer's channels_last grad-input, a stride-0 sum gradient).
  const bool channels_inner = gs[1] == 1 && ys[1] == 1 && is[1] == 1;
  const bool rows_inner = ys[3] == 1 && is[3] == 1 && !channels_inner;
  constexpr int64_t kChunk = 16;
  // Four window-position planes [kChunk][PW], then the chunk's gradient and pooled rows.
  std::vector<T> planes(rows_inner ? size_t(6 * kChunk * PW) : 0);
  std::vector<uint8_t> q_rows(rows_inner ? size_t(kChunk * PW) : 0);
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t n = task / window_rows, ph = task % window_rows;
    const int64_t first_row = 2 * ph, end_row = ph + 1 == window_rows ? args.conv_h : 2 * ph + 2;
    T* rows = out + (n * args.conv_h + first_row) * row_len;
    if (ph >= PH) {  // no window (conv_h < 2): zeros
      std::fill(rows, rows + (end_row - first_row) * row_len, T(0));
      continue;
    }
    // The odd last column and row belong to no window.
    for (int64_t r = 0; r < 2 && args.conv_w > 2 * PW; ++r) {
      std::fill(rows + r * row_len + 2 * PW * C, rows + (r + 1) * row_len, T(0));
    }
    if (end_row - first_row > 2) std::fill(rows + 2 * row_len, rows + (end_row - first_row) * row_len, T(0));
    const T* g_row = grad + n * gs[0] + ph * gs[2];
    const T* y_row = pooled + n * ys[0] + ph * ys[2];
    const uint8_t* i_row = args.argmax + n * is[0] + ph * is[2];
    if (!rows_inner) {
      for (int64_t pw = 0; pw < PW; ++pw) {
        const T* gp = g_row + pw * gs[3];
        const T* yp = y_row + pw * ys[3];
        const uint8_t* ip = i_row + pw * is[3];
        T* window = rows + 2 * pw * C;
#pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          const uint8_t q = ip[c * is[1]];
          const T v = yp[c * ys[1]] <= T(0) ? T(0) : gp[c * gs[1]];
          window[c] = q == 0 ? v : T(0);
          window[C + c] = q == 1 ? v : T(0);
          window[row_len + c] = q == 2 ? v : T(0);
          window[row_len + C + c] = q == 3 ? v : T(0);
        }
      }
      continue;
    }
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t nc = std::min(kChunk, C - c0);
      // The chunk's rows gathered into [nc][PW] buffers, so that one loop over all nc * PW
      // elements vectorizes (a loop per channel row of PW = 8 or 16 ran as branchy scalar
      // code: GCC 12 has no masked epilogue).
      T* g_buf = planes.data() + 4 * kChunk * PW;
      T* y_buf = g_buf + kChunk * PW;
      uint8_t* q_buf = q_rows.data();
      if (gs[1] == 1 && gs[3] != 1) {  // channels_last gradient: [PW x channels] -> [channels x PW]
        transpose_block(g_row + c0, gs[3], PW, nc, g_buf, PW);
      } else {
        for (int64_t c = 0; c < nc; ++c) {
          const T* gp = g_row + (c0 + c) * gs[1];
          for (int64_t pw = 0; pw < PW; ++pw) g_buf[c * PW + pw] = gp[pw * gs[3]];
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        std::memcpy(y_buf + c * PW, y_row + (c0 + c) * ys[1], size_t(PW) * sizeof(T));
        std::memcpy(q_buf + c * PW, i_row + (c0 + c) * is[1], size_t(PW));
      }
      T* p0 = planes.data();
      T* p1 = p0 + kChunk * PW;
      T* p2 = p1 + kChunk * PW;
      T* p3 = p2 + kChunk * PW;
      const int64_t count = nc * PW;
#pragma omp simd
      for (int64_t e = 0; e < count; ++e) {
        const uint8_t q = q_buf[e];
        const T v = y_buf[e] <= T(0) ? T(0) : g_buf[e];
        p0[e] = q == 0 ? v : T(0);
        p1[e] = q == 1 ? v : T(0);
        p2[e] = q == 2 ? v : T(0);
        p3[e] = q == 3 ? v : T(0);
      }
      // Window position q = 2a + b: conv row 2 ph + a, pixels 2 pw + b.
      for (int q = 0; q < 4; ++q) {
        transpose_block(planes.data() + q * kChunk * PW, PW, nc, PW, rows + (q / 2) * row_len + (q % 2) * C + c0,
                        2 * C);
      }
    }
  }
}

void unpool_relu(const UnpoolArgs& args, int64_t task_begin, int64_t task_end) {
  if (args.dtype == DType::kFloat64) {
    unpool_relu_typed<double>(args, task_begin, task_end);
  } else {
    unpool_relu_typed<float>(args, task_begin, task_end);
  }
}

template <class T>
void depthwise_typed(const DepthwiseArgs& args, int64_t row_begin, int64_t row_end) {
  // Channels a pass keeps in registers: 64 floats = 4 zmm accumulators.
  constexpr int64_t kChunk = 64;
  const T* image = static_cast<const T*>(args.image);
  const T* weight = static_cast<const T*>(args.weight);
  const T* bias = static_cast<const T*>(args.bias);
  T* c = static_cast<T*>(args.c);
  for (int64_t r = row_begin; r < row_end; ++r) {
    const T* base = image + args.row_offsets[r];
    T* out = c + r * args.ldc;
    for (int64_t c0 = 0; c0 < args.channels; c0 += kChunk) {
      const int64_t n = std::min(kChunk, args.channels - c0);
      T acc[kChunk];
      for (int64_t j = 0; j < n; ++j) acc[j] = bias ? bias[c0 + j] : T(0);
      for (int64_t k = 0; k < args.taps; ++k) {
        const T* x = base + args.tap_offsets[k] + c0;
        const T* w = weight + k * args.channels + c0;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += x[j] * w[j];
      }
      for (int64_t j = 0; j < n; ++j) {
        out[c0 + j] = args.relu ? bias_act::activation_forward<bias_act::Activation::kRelu, T>(acc[j]) : acc[j];
      }
    }
  }
}

void depthwise(const DepthwiseArgs& args, int64_t row_begin, int64_t row_end) {
  if (args.dtype == DType::kFloat64) {
    depthwise_typed<double>(args, row_begin, row_end);
  } else {
    depthwise_typed<float>(args, row_begin, row_end);
  }
}

template <class T>
void depthwise_weight_grad_typed(const DepthwiseWeightGradArgs& args) {
  // 64 channels at a time: the [taps][64] sums stay in L1 while the pixels stream by.
  constexpr int64_t kChunk = 64;
  const T* image = static_cast<const T*>(args.image);
  const T* grad = static_cast<const T*>(args.grad);
  T* out = static_cast<T*>(args.out);
  std::vector<T> sums(size_t(args.taps * kChunk));
  for (int64_t c0 = 0; c0 < args.channels; c0 += kChunk) {
    const int64_t n = std::min(kChunk, args.channels - c0);
    std::fill(sums.begin(), sums.end(), T(0));
    for (int64_t p = 0; p < args.pixels; ++p) {
      const T* g = grad + p * args.channels + c0;
      const T* base = image + args.pixel_offsets[p] + c0;
      for (int64_t k = 0; k < args.taps; ++k) {
        const T* x = base + args.tap_offsets[k];
        T* acc = sums.data() + k * kChunk;
#pragma omp simd
        for (int64_t j = 0; j < n; ++j) acc[j] += x[j] * g[j];
      }
    }
    for (int64_t k = 0; k < args.taps; ++k) {
      for (int64_t j = 0; j < n; ++j) out[k * args.channels + c0 + j] = sums[size_t(k * kChunk + j)];
    }
  }
}

void depthwise_weight_grad(const DepthwiseWeightGradArgs& args) {
  if (args.dtype == DType::kFloat64) {
    depthwise_weight_grad_typed<double>(args);
  } else {
    depthwise_weight_grad_typed<float>(args);
  }
}

// The two nonzero entries (column, coefficient) of row p of the Winograd input transform
// B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1] (both directions).
struct TwoTerms {
  int index[2];
  double coef[2];
};
constexpr TwoTerms kInputRows[4] = {{{0, 2}, {1, -1}}, {{1, 2}, {1, 1}}, {{2, 1}, {1, -1}}, {{1, 3}, {1, -1}}};

// V = B^T d B of one 4x4 block (B^T = kInputRows): d[i][j] = load(i, j), element e = 4i + j
// of V to store(e, value). U is a vector or a scalar; the coefficients are +-1, so each
// term is an exact add or subtract once the loops unroll.
template <class U, class Load, class Store>
FL_INLINE void winograd_input_tile(const Load& load, const Store& store) {
  // x or -x for a coefficient of +1 or -1: constants once the loops unroll.
  const auto signed_sum = [](const TwoTerms& t, U a, U b) {
    return (t.coef[0] > 0 ? a : -a) + (t.coef[1] > 0 ? b : -b);
  };
  U r[4][4];
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      r[p][j] = signed_sum(kInputRows[p], load(kInputRows[p].index[0], j), load(kInputRows[p].index[1], j));
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) {
      store(4 * i + q, signed_sum(kInputRows[q], r[i][kInputRows[q].index[0]], r[i][kInputRows[q].index[1]]));
    }
  }
}

// B^T d B of the 4x4 block at d (pixel rows `pixel_row` elements apart, pixels C apart,
// channels contiguous) for all C channels: element e of channel c to vt[e * v_step + c].
template <class T>
FL_INLINE void winograd_input_channels(const T* d, int64_t pixel_row, int64_t C, T* vt, int64_t v_step) {
  using Vec = typename VecOf<T>::type;
  constexpr int64_t W = kVecBytes / sizeof(T);
  const int64_t c_full = C / W * W;
  for (int64_t c = 0; c < c_full; c += W) {
    winograd_input_tile<Vec>([&](int i, int j) { return load_vec(d + i * pixel_row + j * C + c); },
                             [&](int e, Vec x) { store_vec(vt + e * v_step + c, x); });
  }
  for (int64_t c = c_full; c < C; ++c) {
    winograd_input_tile<T>([&](int i, int j) { return d[i * pixel_row + j * C + c]; },
                           [&](int e, T x) { vt[e * v_step + c] = x; });
  }
}

// Y = A^T M A + bias of one tile, A^T = [1 1 1 0; 0 1 -1 -1]: M[e] = load(e), y[i][j] the
// output pixel (i, j) of the tile.
template <class U, class Load>
FL_INLINE void winograd_output_tile(const Load& load, U bias, U y[2][2]) {
  U s[2][4];
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const U m0 = load(j), m1 = load(4 + j), m2 = load(8 + j), m3 = load(12 + j);
    s[0][j] = m0 + m1 + m2;
    s[1][j] = m1 - m2 - m3;
  }
#pragma GCC unroll 2
  for (int i = 0; i < 2; ++i) {
    y[i][0] = s[i][0] + s[i][1] + s[i][2] + bias;
    y[i][1] = s[i][1] - s[i][2] - s[i][3] + bias;
  }
}

// The step between a buffer's 16 transformed elements: `elements`, or one cache line
// more when that is a multiple of 4 KiB. The 16 elements of a tile are stored (and read
// back) together; at a 4 KiB multiple they all fall in one L1 set (64 sets of 64 bytes).
// B32 C64->128 32x32 (steps of 8 and 16 KiB): forward 7.47-7.53 ms instead of 7.85-7.90,
// grad-input 7.68-7.77 instead of 8.50-8.68; grad-weight's 128-tile blocks ran 40% slower
// unpadded. Steps that do not alias stay as they are (16x16, 3 and 6 KiB: padding them
// measured 3% slower).
template <class T>
int64_t unaliased_step(int64_t elements) {
  constexpr int64_t kLine = 64 / int64_t(sizeof(T));
  return elements * int64_t(sizeof(T)) % 4096 == 0 ? elements + kLine : elements;
}

template <class T>
bool winograd_typed(const WinogradArgs& args, int64_t unit_begin, int64_t unit_end) {
  using Vec = typename VecOf<T>::type;
  constexpr int64_t W = kVecBytes / sizeof(T);
  const int64_t C = args.channels, K = args.out_channels, ldw = args.ldw;
  const int64_t units_per_image = args.units_per_image;
  const int64_t max_rows = (args.tiles_h + units_per_image - 1) / units_per_image;
  const int64_t tiles_w = args.tiles_w, max_tiles = max_rows * tiles_w;
  const int64_t v_step = unaliased_step<T>(max_tiles * C), m_step = unaliased_step<T>(max_tiles * ldw);
  const int64_t k_full = K / W * W;
  const T* weight = static_cast<const T*>(args.weight);
  const T* bias = static_cast<const T*>(args.bias);
  T* out = static_cast<T*>(args.out);
  std::vector<T> v(static_cast<size_t>(16 * v_step)), m(static_cast<size_t>(16 * m_step));
  PlacedRows<T> input_rows(args.input, 2 * max_rows + 2);  // a unit's padded input rows
  // NCHW: the unit's output rows as NHWC, then transposed into the planes. Pixels past
  // the output's last row or column (odd sizes) go to a discarded row.
  std::vector<T> block(args.nchw ? static_cast<size_t>(2 * max_rows * args.out_w * ldw) : 0);
  std::vector<T> discard(static_cast<size_t>(ldw));
  const Vec zero = Vec{};
  Vec check = Vec{};  // stays 0 while every value is finite: x - x is NaN for inf and NaN
  T check_tail = T(0);
  for (int64_t unit = unit_begin; unit < unit_end; ++unit) {
    const int64_t n = unit / units_per_image;
    const int64_t run = unit % units_per_image;
    const int64_t tile_row0 = run * args.tiles_h / units_per_image;
    const int64_t tile_row1 = (run + 1) * args.tiles_h / units_per_image;
    const int64_t tiles = (tile_row1 - tile_row0) * tiles_w;
    const T* rows = input_rows.place(n, 2 * tile_row0, 2 * tile_row1 + 2);
    const int64_t row_len = input_rows.row_len();
    for (int64_t t = 0; t < tiles; ++t) {
      const T* d = rows + 2 * (t / tiles_w) * row_len + 2 * (t % tiles_w) * C;
      winograd_input_channels(d, row_len, C, v.data() + t * C, v_step);
    }
    // M_e = V_e U_e for the 16 elements e of the transformed tile, all ldw columns (U's
    // padding columns are zero).
    for (int e = 0; e < 16; ++e) {
      dense_gemm(v.data() + e * v_step, C, 1, tiles, weight + e * C * ldw, ldw, C, ldw, m.data() + e * m_step, ldw,
                 false);
    }
    const int64_t row0 = 2 * tile_row0, row1 = std::min(args.out_h, 2 * tile_row1);
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t oh = 2 * (tile_row0 + t / tiles_w), ow = 2 * (t % tiles_w);
      T* y[2][2];
      for (int i = 0; i < 2; ++i) {
        for (int j = 0; j < 2; ++j) {
          const bool inside = oh + i < args.out_h && ow + j < args.out_w;
          const int64_t pixel = (oh + i) * args.out_w + ow + j;
          y[i][j] = !inside   ? discard.data()
                    : args.nchw ? block.data() + (pixel - row0 * args.out_w) * ldw
                                : out + (n * args.out_h * args.out_w + pixel) * K;
        }
      }
      const T* mt = m.data() + t * ldw;
      for (int64_t k = 0; k < k_full; k += W) {
        Vec r[2][2];
        winograd_output_tile<Vec>([&](int e) { return load_vec(mt + e * m_step + k); },
                                  bias != nullptr ? load_vec(bias + k) : zero, r);
        for (int i = 0; i < 2; ++i) {
          for (int j = 0; j < 2; ++j) {
            check += r[i][j] - r[i][j];
            store_vec(y[i][j] + k, args.relu ? (r[i][j] < zero ? zero : r[i][j]) : r[i][j]);
          }
        }
      }
      for (int64_t k = k_full; k < K; ++k) {
        T r[2][2];
        winograd_output_tile<T>([&](int e) { return mt[e * m_step + k]; }, bias != nullptr ? bias[k] : T(0), r);
        for (int i = 0; i < 2; ++i) {
          for (int j = 0; j < 2; ++j) {
            check_tail += r[i][j] - r[i][j];
            y[i][j][k] = args.relu ? bias_act::activation_forward<bias_act::Activation::kRelu, T>(r[i][j]) : r[i][j];
          }
        }
      }
    }
    if (args.nchw) {
      const int64_t plane = args.out_h * args.out_w;
      transpose_block(block.data(), ldw, (row1 - row0) * args.out_w, K, out + n * K * plane + row0 * args.out_w,
                      plane);
    }
  }
  T lanes[W];
  store_vec(lanes, check);
  for (int64_t i = 0; i < W; ++i) check_tail += lanes[i];
  return check_tail == T(0);
}

bool winograd(const WinogradArgs& args, int64_t unit_begin, int64_t unit_end) {
  if (args.dtype == DType::kFloat64) return winograd_typed<double>(args, unit_begin, unit_end);
  return winograd_typed<float>(args, unit_begin, unit_end);
}

// (G' g G'^T) of one 2x2 grad_output tile, G' = [1 0; 1/2 1/2; 1/2 -1/2; 0 -1] (the
// grad-weight's filter transform, WinogradWeightGradArgs): g[i][j] = load(i, j), element
// e = 4p + q of the result to store(e, value). U is a vector of T or T.
template <class T, class U, class Load, class Store>
FL_INLINE void winograd_grad_tile(const Load& load, const Store& store) {
  const auto rows = [](U a, U b, U out[4]) {
    out[0] = a;
    out[1] = T(0.5) * (a + b);
    out[2] = T(0.5) * (a - b);
    out[3] = -b;
  };
  U r[2][4];  // r[j][p] = (G' g)[p][j]
#pragma GCC unroll 2
  for (int j = 0; j < 2; ++j) rows(load(0, j), load(1, j), r[j]);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    U y[4];
    rows(r[0][p], r[1][p], y);
#pragma GCC unroll 4
    for (int q = 0; q < 4; ++q) store(4 * p + q, y[q]);
  }
}

template <class T>
void winograd_weight_grad_typed(const WinogradWeightGradArgs& args, int64_t chunk_begin, int64_t chunk_end) {
  using Vec = typename VecOf<T>::type;
  constexpr int64_t W = kVecBytes / sizeof(T);
  const int64_t C = args.channels, K = args.out_channels;
  const int64_t ldu = args.ldp;
  const int64_t k_full = K / W * W;
  // Tiles a block: the transformed operands of all 16 elements ([16][tiles][C] and
  // [16][tiles][ldu]) within 1 MiB (this machine's L2 a core), at most the GEMM
  // micro-kernel's depth block. Measured with 512 KiB, 1 MiB and 2 MiB at B64 C32->64
  // 16x16, B32 C64->128 32x32 and B8 C128 56x56: 1 MiB as fast or faster on all three.
  constexpr int64_t kOperandBytes = int64_t{1} << 20, kMaxBlockTiles = 128;
  const int64_t block_tiles =
      std::clamp<int64_t>(kOperandBytes / (16 * (C + ldu) * int64_t(sizeof(T))), 16, kMaxBlockTiles);
  const int64_t v_step = unaliased_step<T>(block_tiles * C), u_step = unaliased_step<T>(block_tiles * ldu);
  T* partials = static_cast<T*>(args.partials);
  std::vector<T> v(static_cast<size_t>(16 * v_step)), u(static_cast<size_t>(16 * u_step));
  // The current tile row's 4 padded input rows and 2 grad_output rows.
  PlacedRows<T> input_rows(args.input, 4), grad_rows(args.grad, 2);
  const int64_t pixel_row = input_rows.row_len(), grad_row = grad_rows.row_len();
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    const int64_t first = chunk * args.tiles_per_chunk, last = std::min(args.tiles, first + args.tiles_per_chunk);
    for (int64_t block = first; block < last; block += block_tiles) {
      const int64_t count = std::min(block_tiles, last - block);
      // The block's 16 (B^T d B) and (G' g G'^T), one tile at a time: each input and
      // grad_output value is loaded once.
      for (int64_t t = 0; t < count; ++t) {
        const int64_t tile = block + t, n = tile / (args.tiles_h * args.tiles_w);
        const int64_t tile_row = tile / args.tiles_w % args.tiles_h, tile_col = tile % args.tiles_w;
        const T* d = input_rows.place(n, 2 * tile_row, 2 * tile_row + 4) + 2 * tile_col * C;
        winograd_input_channels(d, pixel_row, C, v.data() + t * C, v_step);
        const T* g = grad_rows.place(n, 2 * tile_row, 2 * tile_row + 2) + 2 * tile_col * K;
        T* ut = u.data() + t * ldu;
        for (int64_t k = 0; k < k_full; k += W) {
          winograd_grad_tile<T, Vec>([&](int i, int j) { return load_vec(g + i * grad_row + j * K + k); },
                                     [&](int e, Vec x) { store_vec(ut + e * u_step + k, x); });
        }
        for (int64_t k = k_full; k < K; ++k) {
          winograd_grad_tile<T, T>([&](int i, int j) { return g[i * grad_row + j * K + k]; },
                                   [&](int e, T x) { ut[e * u_step + k] = x; });
        }
      }
      // partials[chunk][e] (+)= V_e^T U_e: rows c, depth the block's tiles, columns k
      // (K, as wide as C or wider in most layers, fills the wider register tiles).
      for (int e = 0; e < 16; ++e) {
        dense_gemm(v.data() + e * v_step, 1, C, C, u.data() + e * u_step, ldu, count, ldu,
                   partials + (chunk * 16 + e) * C * ldu, ldu, block > first);
      }
    }
  }
}

void winograd_weight_grad(const WinogradWeightGradArgs& args, int64_t chunk_begin, int64_t chunk_end) {
  if (args.dtype == DType::kFloat64) return winograd_weight_grad_typed<double>(args, chunk_begin, chunk_end);
  winograd_weight_grad_typed<float>(args, chunk_begin, chunk_end);
}

// The source position destination position `dst` pairs with through tap k, when it exists
// (ColumnsToImageArgs).
FL_INLINE bool column_source(bool forward, int64_t dst, int64_t k, int64_t stride, int64_t pad, int64_t dilation,
                             int64_t src_size, int64_t& src) {
  if (!forward) return conv2d::tap_source(dst, k, stride, pad, dilation, src_size, src);
  src = dst * stride - pad + k * dilation;
  return src >= 0 && src < src_size;
}

// Each task gathers its destination row pixel by pixel: a vector of the channels (W at a
// time) sums the (kh, kw) columns of the source pixels paired with the pixel, in (kh, kw)
// order, in registers (loads only: a scatter of adds into a row buffer re-read each
// pixel's lanes right after storing them). Then one store per pixel, to the destination
// (channels_last) or to a row buffer transposed into the NCHW planes.
template <class T>
void columns_to_image_typed(const ColumnsToImageArgs& a, int64_t task_begin, int64_t task_end) {
  using Vec = typename VecOf<T>::type;
  constexpr int W = kVecBytes / sizeof(T);
  const T* cols = static_cast<const T*>(a.columns);
  const T* bias = static_cast<const T*>(a.bias);
  T* out = static_cast<T*>(a.out);
  const int C = static_cast<int>(a.channels);
  const int64_t* s = a.out_stride;
  const bool direct = s[1] == 1 && s[3] == C;  // channels_last rows: stored in place
  const Vec zero = Vec{};
  // Destination column x pairs with the (kw, source column) listed in column_taps[first[x]
  // .. first[x + 1]), in kw order, as the element offset src * ldc + kw * C: only
  // the pairs that exist (a strided grad-input pairs each column with 1 / stride of the
  // taps; testing every tap of every pixel, and a division per (column, tap) to build the
  // table, made an 80-tap stride-4 Conv1d's grad-input several times slower).
  std::vector<int64_t> first(size_t(a.dst_w + 1)), column_taps;
  if (a.forward) {  // src = x stride - pad + kw dilation
    for (int64_t x = 0; x < a.dst_w; ++x) {
      first[size_t(x)] = int64_t(column_taps.size());
      for (int64_t kw = 0; kw < a.kernel_w; ++kw) {
        const int64_t src = x * a.stride_w - a.pad_w + kw * a.dilation_w;
        if (src >= 0 && src < a.src_w) column_taps.push_back(src * a.ldc + kw * C);
      }
    }
  } else {  // x = src stride - pad + kw dilation: walk the pairs from the source side, no division
    std::vector<int64_t> count(size_t(a.dst_w + 1), 0);
    const auto for_each_pair = [&](auto&& fn) {
      for (int64_t kw = 0; kw < a.kernel_w; ++kw) {
        for (int64_t src = 0; src < a.src_w; ++src) {
          const int64_t x = src * a.stride_w - a.pad_w + kw * a.dilation_w;
          if (x >= 0 && x < a.dst_w) fn(x, kw, src);
        }
      }
    };
    for_each_pair([&](int64_t x, int64_t, int64_t) { ++count[size_t(x) + 1]; });
    for (int64_t x = 0; x < a.dst_w; ++x) count[size_t(x) + 1] += count[size_t(x)];
    first = count;
    column_taps.resize(size_t(count[size_t(a.dst_w)]));
    // kw ascending in the outer loop: each column's pairs land in kw order.
    for_each_pair([&](int64_t x, int64_t kw, int64_t src) {
      column_taps[size_t(count[size_t(x)]++)] = src * a.ldc + kw * C;
    });
  }
  first[size_t(a.dst_w)] = int64_t(column_taps.size());
  std::vector<T> row(direct ? 0 : size_t(a.dst_w * C));
  std::vector<const T*> tap_rows(size_t(a.kernel_h));  // per kh: the columns of its source row, or null
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t n = task / a.dst_h, y = task % a.dst_h;
    for (int64_t kh = 0; kh < a.kernel_h; ++kh) {
      int64_t src = 0;
      const bool inside = column_source(a.forward, y, kh, a.stride_h, a.pad_h, a.dilation_h, a.src_h, src);
      tap_rows[size_t(kh)] = inside ? cols + (n * a.src_h + src) * a.src_w * a.ldc + kh * a.kernel_w * C : nullptr;
    }
    T* dst_row = direct ? out + n * s[0] + y * s[2] : row.data();
    for (int64_t x = 0; x < a.dst_w; ++x) {
      for (int c0 = 0; c0 < C; c0 += W) {  // one vector unless there are more than W channels
        const int lanes = std::min(W, C - c0);
        Vec acc = zero;
        for (int64_t kh = 0; kh < a.kernel_h; ++kh) {
          const T* taps = tap_rows[size_t(kh)];
          if (taps == nullptr) continue;
          for (int64_t e = first[size_t(x)]; e < first[size_t(x) + 1]; ++e) {
            acc += load_lanes(taps + c0 + column_taps[size_t(e)], lanes);
          }
        }
        if (bias != nullptr) acc += load_lanes(bias + c0, lanes);
        // bias_act's ReLU on a vector: NaN < 0 is false, NaN is kept.
        if (a.relu) acc = acc < zero ? zero : acc;
        store_lanes(dst_row + x * C + c0, acc, lanes);
      }
    }
    if (!direct) {
      T* dst = out + n * s[0] + y * s[2];
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t x = 0; x < a.dst_w; ++x) dst[c * s[1] + x * s[3]] = row[size_t(x * C + c)];
      }
    }
  }
}

void columns_to_image(const ColumnsToImageArgs& args, int64_t task_begin, int64_t task_end) {
  if (args.dtype == DType::kFloat64) return columns_to_image_typed<double>(args, task_begin, task_end);
  columns_to_image_typed<float>(args, task_begin, task_end);
}

template <class T>
void narrow_weight_grad_typed(const NarrowWeightGradArgs& a, int64_t chunk_begin, int64_t chunk_end) {
  const T* image = static_cast<const T*>(a.image);
  const T* grad = static_cast<const T*>(a.grad);
  T* partials = static_cast<T*>(a.partials);
  const int64_t K = a.out_channels, taps = a.kernel_h * a.kernel_w;
  for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
    T* partial = partials + chunk * taps * K * a.ldc;
    const int64_t row_end = std::min(a.total_rows, (chunk + 1) * a.chunk_rows);
    for (int64_t row = chunk * a.chunk_rows; row < row_end; ++row) {
      const int64_t n = row / a.out_h, oh = row % a.out_h;
      const T* g = grad + row * a.out_w * K;
      for (int64_t kh = 0; kh < a.kernel_h; ++kh) {
        const T* image_row = image + (n * a.rows + oh * a.stride_h + kh * a.dilation_h) * a.cols * a.ldc;
        for (int64_t kw = 0; kw < a.kernel_w; ++kw) {
          dense_gemm(g, 1, K, K, image_row + kw * a.dilation_w * a.ldc, a.stride_w * a.ldc, a.out_w, a.ldc,
                     partial + (kh * a.kernel_w + kw) * K * a.ldc, a.ldc, /*accumulate=*/true);
        }
      }
    }
  }
}

void narrow_weight_grad(const NarrowWeightGradArgs& args, int64_t chunk_begin, int64_t chunk_end) {
  if (args.dtype == DType::kFloat64) return narrow_weight_grad_typed<double>(args, chunk_begin, chunk_end);
  narrow_weight_grad_typed<float>(args, chunk_begin, chunk_end);
}

}  // namespace

extern const conv2d::CpuKernels conv2d_cpu_kernels;
const conv2d::CpuKernels conv2d_cpu_kernels = {&offset_gemm, &max_pool_2x2, &place_image, &store_nchw, &depthwise,
                                                   &depthwise_weight_grad, &unpool_relu, &winograd,
                                                   &winograd_weight_grad, &columns_to_image,
                                                   &narrow_weight_grad};

}  // namespace fastlayers::FL_CPU_NS

// Fused LSTM / Elman RNN pointwise kernels for the CPU. Compiled once per ISA into
// namespace fastlayers::FL_CPU_NS (see csrc/cmake/FastlayersCpuKernels.cmake); the
// loops over the hidden units of one batch row are plain C++ the compiler vectorizes
// at the ISA's width (`omp simd`), the math in rnn_math.h. Parallelism over batch
// rows lives in the caller (at::parallel_for).
//
// float32 and float64 GEMMs have their own micro-kernel. ATen's CPU sgemm is MKL,
// which on this AMD Zen 5 runs its AVX2 path: measured single-threaded 35-55 GFLOP/s
// on the per-step recurrent GEMM (e.g. 100 x 50 x 200, where it also re-packs the
// same weight every step) and 13-100 GFLOP/s on the layer's input-projection, input- and
// weight-gradient GEMMs (thin shapes such as N = 10 are worst), against a fp32 FMA
// peak of ~270 per core. A 6-row x 2-vector register tile of FMAs over B packed once
// (per op call for the recurrent weight) does better on all of them. Written with GCC
// vector extensions, it compiles at each ISA's vector width (AVX-512: 16 floats or 8
// doubles, AVX2: 8 / 4, SSE2: 4 / 2); blocking over k and orientation live in the
// caller (rnn.cpp). float64 runs the same tiles at half the width: with MKL's dgemm
// the float64 LSTM train step at the seed size took 21.4 ms, with this kernel 17.3 ms
// (1 thread, back-to-back runs on a loaded machine; most of the rest was libm's scalar
// exp/tanh, now branch-free in common/math.h).
#include <algorithm>
#include <cstring>

#include "common/cpu_scalar.h"
#include "common/cpu_transpose.h"
#include "rnn/rnn_kernel.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using cpu::compute_t;
using cpu::load;
using cpu::store;
using rnn::BackwardArgs;
using rnn::Cell;
using rnn::ForwardArgs;

#if defined(FL_CPU_ISA_avx512)
constexpr int kVecBytes = 64;
#elif defined(FL_CPU_ISA_avx2)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

// Hidden units per block of the LSTM loops: one vector of the compute type. A row's
// last, partial block runs the same vector code on zero-padded copies; left to the
// compiler it ran element by element, as slow as the rest of the row at H = 50.
template <class S> constexpr int64_t kUnitBlock = kVecBytes / static_cast<int64_t>(sizeof(compute_t<S>));

// The first `count` (< kUnitBlock) elements of a row into a zero-padded block, and back.
template <class S>
FL_INLINE void load_tail(S* block, const S* src, int64_t count) {
  cpu::load_partial<kUnitBlock<S> * sizeof(S)>(block, src, static_cast<int>(count * sizeof(S)));
}

template <class S>
FL_INLINE void store_tail(S* dst, const S* block, int64_t count) {
  cpu::store_partial<kUnitBlock<S> * sizeof(S)>(dst, block, static_cast<int>(count * sizeof(S)));
}

template <class S>
FL_INLINE void lstm_forward_units(S* zi, S* zf, S* zg, S* zo, const S* c_prev, S* h_next, S* c_next,
                                  int64_t count) {
  using T = compute_t<S>;
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const rnn::LstmGates<T> a = rnn::lstm_activate<T>(T(load(zi[j])), T(load(zf[j])), T(load(zg[j])), T(load(zo[j])));
    const T c = a.f * T(load(c_prev[j])) + a.i * a.g;
    zi[j] = store<S>(a.i);
    zf[j] = store<S>(a.f);
    zg[j] = store<S>(a.g);
    zo[j] = store<S>(a.o);
    c_next[j] = store<S>(c);
    h_next[j] = store<S>(a.o * math::tanh(c));
  }
}

template <class S>
void lstm_forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = kUnitBlock<S>;
  const int64_t hidden = args.hidden, full = hidden / kBlock * kBlock, tail = hidden - full;
  for (int64_t row = begin; row < end; ++row) {
    S* z = static_cast<S*>(args.gates) + row * 4 * hidden;
    const S* c_prev = static_cast<const S*>(args.cx) + row * hidden;
    S* h_next = static_cast<S*>(args.hy) + row * hidden;
    S* c_next = static_cast<S*>(args.cy) + row * hidden;
    lstm_forward_units(z, z + hidden, z + 2 * hidden, z + 3 * hidden, c_prev, h_next, c_next, full);
    if (tail == 0) continue;
    alignas(64) S gates[4][kBlock], c_in[kBlock], h_out[kBlock], c_out[kBlock];
    for (int g = 0; g < 4; ++g) load_tail<S>(gates[g], z + g * hidden + full, tail);
    load_tail<S>(c_in, c_prev + full, tail);
    lstm_forward_units(gates[0], gates[1], gates[2], gates[3], c_in, h_out, c_out, kBlock);
    for (int g = 0; g < 4; ++g) store_tail<S>(z + g * hidden + full, gates[g], tail);
    store_tail<S>(h_next + full, h_out, tail);
    store_tail<S>(c_next + full, c_out, tail);
  }
}

template <Cell C, class S>
void rnn_forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const S* z = static_cast<const S*>(args.gates) + row * hidden;
    S* h_next = static_cast<S*>(args.hy) + row * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      h_next[j] = store<S>(rnn::rnn_activate<C, T>(T(load(z[j]))));
    }
  }
}

// Inputs: the activated gates, c, c', the gradients at h' and c' (each from the output
// and from step t + 1); outputs d loss / d z per gate and d loss / d c. dc_prev may
// alias dc_rec: each element is read before it is written.
template <class S>
FL_INLINE void lstm_backward_units(const S* const gates[4], const S* c_prev, const S* c_next, const S* dh,
                                   const S* dh_rec, const S* dc, const S* dc_rec, S* const dz[4], S* dc_prev,
                                   int64_t count) {
  using T = compute_t<S>;
  const S *gi = gates[0], *gf = gates[1], *gg = gates[2], *go = gates[3];
  S *dzi = dz[0], *dzf = dz[1], *dzg = dz[2], *dzo = dz[3];
#pragma omp simd
  for (int64_t j = 0; j < count; ++j) {
    const rnn::LstmGates<T> a{T(load(gi[j])), T(load(gf[j])), T(load(gg[j])), T(load(go[j]))};
    const T grad_h = T(load(dh[j])) + T(load(dh_rec[j]));
    const T grad_c = T(load(dc[j])) + T(load(dc_rec[j]));
    const rnn::LstmGateGrads<T> d = rnn::lstm_gate_grads<T>(a, T(load(c_prev[j])), T(load(c_next[j])), grad_h, grad_c);
    dzi[j] = store<S>(d.i);
    dzf[j] = store<S>(d.f);
    dzg[j] = store<S>(d.g);
    dzo[j] = store<S>(d.o);
    dc_prev[j] = store<S>(d.c_prev);
  }
}

template <class S>
void lstm_backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  constexpr int64_t kBlock = kUnitBlock<S>;
  const int64_t hidden = args.hidden, full = hidden / kBlock * kBlock, tail = hidden - full;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = row * hidden;
    const S* g = static_cast<const S*>(args.gates) + 4 * offset;
    const S* c_prev = static_cast<const S*>(args.cx) + offset;
    const S* c_next = static_cast<const S*>(args.cy) + offset;
    const S* dh = static_cast<const S*>(args.grad_hy) + offset;
    const S* dh_rec = static_cast<const S*>(args.grad_hy_recurrent) + offset;
    const S* dc = static_cast<const S*>(args.grad_cy) + offset;
    const S* dc_rec = static_cast<const S*>(args.grad_cy_recurrent) + offset;
    S* dz = static_cast<S*>(args.grad_gates) + 4 * offset;
    S* dc_prev = static_cast<S*>(args.grad_cx) + offset;
    const S* const gates[4] = {g, g + hidden, g + 2 * hidden, g + 3 * hidden};
    S* const grads[4] = {dz, dz + hidden, dz + 2 * hidden, dz + 3 * hidden};
    lstm_backward_units(gates, c_prev, c_next, dh, dh_rec, dc, dc_rec, grads, dc_prev, full);
    if (tail == 0) continue;
    // Inputs 0-3 gates, 4 c, 5 c', 6-7 dh, 8-9 dc; outputs 0-3 dz, 4 dc_prev.
    alignas(64) S in[10][kBlock], out[5][kBlock];
    const S* const sources[10] = {gates[0], gates[1], gates[2], gates[3], c_prev, c_next, dh, dh_rec, dc, dc_rec};
    for (int i = 0; i < 10; ++i) load_tail<S>(in[i], sources[i] + full, tail);
    const S* const tail_gates[4] = {in[0], in[1], in[2], in[3]};
    S* const tail_grads[4] = {out[0], out[1], out[2], out[3]};
    lstm_backward_units(tail_gates, in[4], in[5], in[6], in[7], in[8], in[9], tail_grads, out[4], kBlock);
    for (int i = 0; i < 4; ++i) store_tail<S>(grads[i] + full, out[i], tail);
    store_tail<S>(dc_prev + full, out[4], tail);
  }
}

template <Cell C, class S>
void rnn_backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = row * hidden;
    const S* h = static_cast<const S*>(args.hy) + offset;
    const S* dh = static_cast<const S*>(args.grad_hy) + offset;
    const S* dh_rec = static_cast<const S*>(args.grad_hy_recurrent) + offset;
    S* dz = static_cast<S*>(args.grad_gates) + offset;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      dz[j] = store<S>(rnn::rnn_grad<C, T>(T(load(h[j])), T(load(dh[j])) + T(load(dh_rec[j]))));
    }
  }
}

constexpr int kTileRows = 6;  // rows of a register tile: 12 accumulators

// One register of S (float or double) and the GEMM's panel width: a register tile is
// kTileRows rows x 2 vectors, so a panel is 32 floats or 16 doubles wide at AVX-512.
template <class S> struct Simd {
  static constexpr int kWidth = kVecBytes / static_cast<int>(sizeof(S));
  static constexpr int kPanelWidth = 2 * kWidth;
  typedef S Vec __attribute__((vector_size(kVecBytes)));
};

template <class S>
FL_INLINE typename Simd<S>::Vec load_vec(const S* p) {
  typename Simd<S>::Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <class S>
FL_INLINE void store_vec(S* p, typename Simd<S>::Vec v) {
  std::memcpy(p, &v, sizeof(v));
}

// C[rows, cols] (+)= A[rows, k] * panel (+ bias), cols <= Vectors * kWidth <= kPanelWidth.
// A panel whose columns fit one vector (the last of N = 200 at 32 a panel, or N = 10)
// runs with Vectors = 1: half the FMAs of the full tile. `bias` (null, or the panel's
// columns of the bias, zero-padded to the panel width) starts the sums. A is row-major
// (element (r, p) at a[r * lda + p]) or column-major (at a[r + p * lda]).
template <class S, int Rows, int Vectors, bool ColumnMajorA>
void gemm_tile(const S* a, int64_t lda, const S* panel, int64_t k, S* c, int64_t ldc, int cols, bool accumulate,
               const S* bias) {
  using Vec = typename Simd<S>::Vec;
  constexpr int kWidth = Simd<S>::kWidth, kPanelWidth = Simd<S>::kPanelWidth;
  Vec start[Vectors];
#pragma GCC unroll 2
  for (int v = 0; v < Vectors; ++v) start[v] = bias != nullptr ? load_vec(bias + v * kWidth) : Vec{};
  Vec acc[Rows][Vectors];
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < Vectors; ++v) acc[r][v] = start[v];
  }
  for (int64_t p = 0; p < k; ++p) {
    Vec b[Vectors];
#pragma GCC unroll 2
    for (int v = 0; v < Vectors; ++v) b[v] = load_vec(panel + p * kPanelWidth + v * kWidth);
#pragma GCC unroll 6
    for (int r = 0; r < Rows; ++r) {
      const S av = ColumnMajorA ? a[r + p * lda] : a[r * lda + p];
#pragma GCC unroll 2
      for (int v = 0; v < Vectors; ++v) acc[r][v] += av * b[v];
    }
  }
  for (int r = 0; r < Rows; ++r) {
    S* row = c + r * ldc;
    if (cols == Vectors * kWidth) {
      for (int v = 0; v < Vectors; ++v) {
        store_vec(row + v * kWidth, accumulate ? load_vec(row + v * kWidth) + acc[r][v] : acc[r][v]);
      }
    } else {  // masked, straight from the registers (cpu::store_bytes)
      for (int v = 0; v < Vectors; ++v) {
        const int bytes = (std::min(kWidth, cols - v * kWidth)) * static_cast<int>(sizeof(S));
        if (bytes <= 0) break;
        Vec x = acc[r][v];
        if (accumulate) x += cpu::load_bytes<Vec>(row + v * kWidth, bytes);
        cpu::store_bytes(row + v * kWidth, x, bytes);
      }
    }
  }
}

template <class S, int Vectors, bool ColumnMajorA>
void gemm_tile_of(int64_t tile_rows, const S* a, int64_t lda, const S* panel, int64_t k, S* c, int64_t ldc, int cols,
                  bool accumulate, const S* bias) {
  switch (tile_rows) {
    case 6: gemm_tile<S, 6, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
    case 5: gemm_tile<S, 5, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
    case 4: gemm_tile<S, 4, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
    case 3: gemm_tile<S, 3, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
    case 2: gemm_tile<S, 2, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
    default: gemm_tile<S, 1, Vectors, ColumnMajorA>(a, lda, panel, k, c, ldc, cols, accumulate, bias); break;
  }
}

// Rows in tiles of kTileRows. A remainder of 1-3 rows would be a tile with too few
// accumulators to cover the FMA latency (2 pipes x 4 cycles want 8 in flight), so it
// and the last full tile become two near-equal tiles instead (6 + 2 rows -> 4 + 4).
template <class S, int Vectors, bool ColumnMajorA>
void gemm_rows(const S* a, int64_t lda, const S* panel, int64_t k, S* c, int64_t ldc, int cols, bool accumulate,
               const S* bias, int64_t rows) {
  const int64_t row_step = ColumnMajorA ? 1 : lda;
  const int64_t remainder = rows % kTileRows;
  const bool balance = rows > kTileRows && remainder > 0 && remainder < 4;
  const int64_t full_end = rows - remainder - (balance ? kTileRows : 0);
  for (int64_t row = 0; row < full_end; row += kTileRows) {
    gemm_tile_of<S, Vectors, ColumnMajorA>(kTileRows, a + row * row_step, lda, panel, k, c + row * ldc, ldc, cols,
                                           accumulate, bias);
  }
  const int64_t left = rows - full_end;
  const int64_t first = balance ? (left + 1) / 2 : left;
  if (first > 0) {
    gemm_tile_of<S, Vectors, ColumnMajorA>(first, a + full_end * row_step, lda, panel, k, c + full_end * ldc, ldc,
                                           cols, accumulate, bias);
  }
  if (left > first) {
    const int64_t row = full_end + first;
    gemm_tile_of<S, Vectors, ColumnMajorA>(left - first, a + row * row_step, lda, panel, k, c + row * ldc, ldc, cols,
                                           accumulate, bias);
  }
}

int64_t gemm_panel_width(DType dtype) {
  return dtype == DType::kFloat64 ? Simd<double>::kPanelWidth : Simd<float>::kPanelWidth;
}

template <class S>
void pack_b_typed(const S* b, int64_t k, int64_t n, int64_t stride_k, int64_t stride_n, S* packed) {
  constexpr int kPanelWidth = Simd<S>::kPanelWidth;
  const int64_t panels = (n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int64_t col0 = panel * kPanelWidth;
    const bool contiguous_full = stride_n == 1 && col0 + kPanelWidth <= n;
    for (int64_t p = 0; p < k; ++p) {
      S* dst = packed + (panel * k + p) * kPanelWidth;
      if (contiguous_full) {  // rows of B in place (dz, activations): one block copy
        std::memcpy(dst, b + p * stride_k + col0, kPanelWidth * sizeof(S));
        continue;
      }
      for (int64_t j = 0; j < kPanelWidth; ++j) {
        const int64_t col = col0 + j;
        dst[j] = col < n ? b[p * stride_k + col * stride_n] : S(0);
      }
    }
  }
}

void pack_b(DType dtype, const void* b, int64_t k, int64_t n, int64_t stride_k, int64_t stride_n, void* packed) {
  if (dtype == DType::kFloat64) {
    pack_b_typed(static_cast<const double*>(b), k, n, stride_k, stride_n, static_cast<double*>(packed));
  } else {
    pack_b_typed(static_cast<const float*>(b), k, n, stride_k, stride_n, static_cast<float*>(packed));
  }
}

// k is walked in chunks so that a chunk of the packed panel (kDepthChunk x 2 vectors,
// 32 KB at AVX-512) stays in L1 while the task's row tiles sweep it.
constexpr int64_t kDepthChunk = 256;

template <class S, bool ColumnMajorA>
void gemm_typed(const rnn::GemmArgs& args, int64_t task_begin, int64_t task_end) {
  constexpr int kPanelWidth = Simd<S>::kPanelWidth;
  const S* a_all = static_cast<const S*>(args.a);
  const S* packed_all = static_cast<const S*>(args.packed_b);
  S* c_all = static_cast<S*>(args.c);
  const int64_t panels = (args.n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t panel = task % panels;
    const int64_t row_begin = (task / panels) * args.row_block;
    const int64_t row_end = std::min(args.m, row_begin + args.row_block);
    const int64_t col = panel * kPanelWidth;
    const int cols = static_cast<int>(std::min<int64_t>(kPanelWidth, args.n - col));
    S bias_tile[kPanelWidth] = {};
    if (args.bias != nullptr) std::copy_n(static_cast<const S*>(args.bias) + col, cols, bias_tile);
    for (int64_t k0 = 0; k0 < args.k; k0 += kDepthChunk) {
      const int64_t depth = std::min(kDepthChunk, args.k - k0);
      const S* packed = packed_all + (panel * args.k + k0) * kPanelWidth;
      const bool accumulate = args.accumulate || k0 > 0;
      const S* bias = args.bias != nullptr && k0 == 0 ? bias_tile : nullptr;
      const S* a = ColumnMajorA ? a_all + row_begin + k0 * args.lda : a_all + row_begin * args.lda + k0;
      S* c = c_all + row_begin * args.ldc + col;
      if (cols <= Simd<S>::kWidth) {
        gemm_rows<S, 1, ColumnMajorA>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate, bias, row_end - row_begin);
      } else {
        gemm_rows<S, 2, ColumnMajorA>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate, bias, row_end - row_begin);
      }
    }
  }
}

void gemm(const rnn::GemmArgs& args, int64_t task_begin, int64_t task_end) {
  if (args.dtype == DType::kFloat64) {
    (args.a_column_major ? gemm_typed<double, true> : gemm_typed<double, false>)(args, task_begin, task_end);
  } else {
    (args.a_column_major ? gemm_typed<float, true> : gemm_typed<float, false>)(args, task_begin, task_end);
  }
}

void forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_forward<S>(args, begin, end); break;
      case Cell::kRnnTanh: rnn_forward<Cell::kRnnTanh, S>(args, begin, end); break;
      case Cell::kRnnRelu: rnn_forward<Cell::kRnnRelu, S>(args, begin, end); break;
    }
  });
}

void backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.cell) {
      case Cell::kLstm: lstm_backward<S>(args, begin, end); break;
      case Cell::kRnnTanh: rnn_backward<Cell::kRnnTanh, S>(args, begin, end); break;
      case Cell::kRnnRelu: rnn_backward<Cell::kRnnRelu, S>(args, begin, end); break;
    }
  });
}

void transpose(DType dtype, const void* src, int64_t lds, int64_t rows, int64_t cols, void* dst, int64_t ldd) {
  if (dtype == DType::kFloat64) {
    transpose_block(static_cast<const double*>(src), lds, rows, cols, static_cast<double*>(dst), ldd);
  } else {
    transpose_block(static_cast<const float*>(src), lds, rows, cols, static_cast<float*>(dst), ldd);
  }
}

}  // namespace

extern const rnn::CpuKernels rnn_cpu_kernels;
const rnn::CpuKernels rnn_cpu_kernels = {&forward, &backward, &gemm_panel_width, &pack_b, &gemm, &transpose};

}  // namespace fastlayers::FL_CPU_NS

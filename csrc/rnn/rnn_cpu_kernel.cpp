// Fused LSTM / Elman RNN pointwise kernels for the CPU. Compiled once per ISA into
// namespace fastlayers::FL_CPU_NS (see csrc/cmake/FastlayersCpuKernels.cmake); the
// loops over the hidden units of one batch row are plain C++ the compiler vectorizes
// at the ISA's width (`omp simd`), the math in rnn_math.h. Parallelism over batch
// rows lives in the caller (at::parallel_for).
//
// float32 GEMMs have their own micro-kernel. ATen's CPU sgemm is MKL, which on this
// AMD Zen 5 runs its AVX2 path: measured single-threaded 35-55 GFLOP/s on the
// per-step recurrent GEMM (e.g. 100 x 50 x 200, where it also re-packs the same
// weight every step) and 13-100 GFLOP/s on the layer's input-projection, input- and
// weight-gradient GEMMs (thin shapes such as N = 10 are worst), against a fp32 FMA
// peak of ~270 per core. A 6-row x 2-vector register tile of FMAs over B packed once
// (per op call for the recurrent weight) does better on all of them. Written with GCC
// vector extensions, it compiles at each ISA's vector width (AVX-512: 16 floats,
// AVX2: 8, SSE2: 4); blocking over k and orientation live in the caller (rnn.cpp).
#include <algorithm>
#include <cstring>

#include "common/cpu_scalar.h"
#include "rnn/rnn_kernel.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using cpu::compute_t;
using cpu::load;
using cpu::store;
using rnn::BackwardArgs;
using rnn::Cell;
using rnn::ForwardArgs;

template <class S>
void lstm_forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    S* z = static_cast<S*>(args.gates) + row * 4 * hidden;
    const S* c_prev = static_cast<const S*>(args.cx) + row * hidden;
    S* h_next = static_cast<S*>(args.hy) + row * hidden;
    S* c_next = static_cast<S*>(args.cy) + row * hidden;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const int64_t ji = j, jf = hidden + j, jg = 2 * hidden + j, jo = 3 * hidden + j;
      const rnn::LstmGates<T> a =
          rnn::lstm_activate<T>(T(load(z[ji])), T(load(z[jf])), T(load(z[jg])), T(load(z[jo])));
      const T c = a.f * T(load(c_prev[j])) + a.i * a.g;
      z[ji] = store<S>(a.i);
      z[jf] = store<S>(a.f);
      z[jg] = store<S>(a.g);
      z[jo] = store<S>(a.o);
      c_next[j] = store<S>(c);
      h_next[j] = store<S>(a.o * math::tanh(c));
    }
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

template <class S>
void lstm_backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const int64_t hidden = args.hidden;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t offset = row * hidden;
    const S* gates = static_cast<const S*>(args.gates) + 4 * offset;
    const S* c_prev = static_cast<const S*>(args.cx) + offset;
    const S* c_next = static_cast<const S*>(args.cy) + offset;
    const S* dh = static_cast<const S*>(args.grad_hy) + offset;
    const S* dh_rec = static_cast<const S*>(args.grad_hy_recurrent) + offset;
    const S* dc = static_cast<const S*>(args.grad_cy) + offset;
    const S* dc_rec = static_cast<const S*>(args.grad_cy_recurrent) + offset;
    S* dz = static_cast<S*>(args.grad_gates) + 4 * offset;
    S* dc_prev = static_cast<S*>(args.grad_cx) + offset;
#pragma omp simd
    for (int64_t j = 0; j < hidden; ++j) {
      const rnn::LstmGates<T> a{T(load(gates[j])), T(load(gates[hidden + j])), T(load(gates[2 * hidden + j])),
                                T(load(gates[3 * hidden + j]))};
      const T grad_h = T(load(dh[j])) + T(load(dh_rec[j]));
      const T grad_c = T(load(dc[j])) + T(load(dc_rec[j]));
      const rnn::LstmGateGrads<T> d =
          rnn::lstm_gate_grads<T>(a, T(load(c_prev[j])), T(load(c_next[j])), grad_h, grad_c);
      dz[j] = store<S>(d.i);
      dz[hidden + j] = store<S>(d.f);
      dz[2 * hidden + j] = store<S>(d.g);
      dz[3 * hidden + j] = store<S>(d.o);
      dc_prev[j] = store<S>(d.c_prev);
    }
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

#if defined(FL_CPU_ISA_avx512)
constexpr int kVecWidth = 16;
#elif defined(FL_CPU_ISA_avx2)
constexpr int kVecWidth = 8;
#else
constexpr int kVecWidth = 4;
#endif
typedef float VecF __attribute__((vector_size(kVecWidth * sizeof(float))));
constexpr int kPanelWidth = 2 * kVecWidth;  // columns of a register tile
constexpr int kTileRows = 6;                // rows of a register tile: 12 accumulators

FL_INLINE VecF load_vec(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

FL_INLINE void store_vec(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }

// C[rows, cols] (+)= A[rows, k] * panel, cols <= kPanelWidth.
template <int Rows>
void gemm_tile(const float* a, int64_t lda, const float* panel, int64_t k, float* c, int64_t ldc, int cols,
               bool accumulate) {
  VecF acc[Rows][2];
#pragma GCC unroll 6
  for (int r = 0; r < Rows; ++r) acc[r][0] = acc[r][1] = VecF{};
  for (int64_t p = 0; p < k; ++p) {
    const VecF b0 = load_vec(panel + p * kPanelWidth);
    const VecF b1 = load_vec(panel + p * kPanelWidth + kVecWidth);
#pragma GCC unroll 6
    for (int r = 0; r < Rows; ++r) {
      const float av = a[r * lda + p];
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < Rows; ++r) {
    float* row = c + r * ldc;
    if (cols == kPanelWidth) {
      store_vec(row, accumulate ? load_vec(row) + acc[r][0] : acc[r][0]);
      store_vec(row + kVecWidth, accumulate ? load_vec(row + kVecWidth) + acc[r][1] : acc[r][1]);
    } else {
      float tile[kPanelWidth];
      store_vec(tile, acc[r][0]);
      store_vec(tile + kVecWidth, acc[r][1]);
      for (int j = 0; j < cols; ++j) row[j] = accumulate ? row[j] + tile[j] : tile[j];
    }
  }
}

int64_t gemm_panel_width() { return kPanelWidth; }

void pack_b(const float* b, int64_t k, int64_t n, int64_t stride_k, int64_t stride_n, float* packed) {
  const int64_t panels = (n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t panel = 0; panel < panels; ++panel) {
    const int64_t col0 = panel * kPanelWidth;
    const bool contiguous_full = stride_n == 1 && col0 + kPanelWidth <= n;
    for (int64_t p = 0; p < k; ++p) {
      float* dst = packed + (panel * k + p) * kPanelWidth;
      if (contiguous_full) {  // rows of B in place (dz, activations): one block copy
        std::memcpy(dst, b + p * stride_k + col0, kPanelWidth * sizeof(float));
        continue;
      }
      for (int64_t j = 0; j < kPanelWidth; ++j) {
        const int64_t col = col0 + j;
        dst[j] = col < n ? b[p * stride_k + col * stride_n] : 0.0f;
      }
    }
  }
}

// k is walked in chunks so that a chunk of the packed panel (kDepthChunk x 32 floats
// at AVX-512, 32 KB) stays in L1 while the task's row tiles sweep it.
constexpr int64_t kDepthChunk = 256;

void gemm(const rnn::GemmArgs& args, int64_t task_begin, int64_t task_end) {
  const int64_t panels = (args.n + kPanelWidth - 1) / kPanelWidth;
  for (int64_t task = task_begin; task < task_end; ++task) {
    const int64_t panel = task % panels;
    const int64_t row_begin = (task / panels) * args.row_block;
    const int64_t row_end = std::min(args.m, row_begin + args.row_block);
    const int64_t col = panel * kPanelWidth;
    const int cols = static_cast<int>(std::min<int64_t>(kPanelWidth, args.n - col));
    for (int64_t k0 = 0; k0 < args.k; k0 += kDepthChunk) {
      const int64_t depth = std::min(kDepthChunk, args.k - k0);
      const float* packed = args.packed_b + (panel * args.k + k0) * kPanelWidth;
      const bool accumulate = args.accumulate || k0 > 0;
      for (int64_t row = row_begin; row < row_end; row += kTileRows) {
        const float* a = args.a + row * args.lda + k0;
        float* c = args.c + row * args.ldc + col;
        switch (std::min<int64_t>(kTileRows, row_end - row)) {
          case 6: gemm_tile<6>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
          case 5: gemm_tile<5>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
          case 4: gemm_tile<4>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
          case 3: gemm_tile<3>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
          case 2: gemm_tile<2>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
          default: gemm_tile<1>(a, args.lda, packed, depth, c, args.ldc, cols, accumulate); break;
        }
      }
    }
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

}  // namespace

extern const rnn::CpuKernels rnn_cpu_kernels;
const rnn::CpuKernels rnn_cpu_kernels = {&forward, &backward, &gemm_panel_width, &pack_b, &gemm};

}  // namespace fastlayers::FL_CPU_NS

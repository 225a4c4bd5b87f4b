// Flash-attention CPU kernels. Compiled once per ISA into namespace
// fastlayers::FL_CPU_NS (csrc/cmake/FastlayersCpuKernels.cmake); parallelism lives in
// the caller (at::parallel_for over units, attention.cpp).
//
// Forward (per batch, head and block of kBlockQ query rows): for each block of
// kBlockK keys, S = Q K^T (one GEMM on the micro-kernel below), s = S * scale + mask
// (and the causal cut), online softmax with the running row max m and sum l, O = O *
// e^(m_old - m_new) + P V (a second GEMM); at the end O / l and lse = m + log l. Extra
// memory is a few tiles per thread: never Lq x Lk.
//
// Backward recomputes P = exp(s - lse) from the saved logsumexp: D = rowsum(dO * O),
// dS = P * (dO V^T - D). dK and dV are computed per key block (summing the query heads
// of a GQA group and all query blocks in order), dQ per query block, or all three in one
// pass per (batch, kv head) (key_value_typed): no atomics, and the same bits either way,
// so the result does not depend on the thread count.
//
// Dropout (dropout.h) multiplies P by a factor of 1/(1-p) or 0 regenerated per tile
// from (seed, offset, slice, row, column): after the row sums in the forward, and as
// P_drop = P f, dS = P (dP f - D) in the backward.
//
// Tiles are copied into zero-padded buffers of the compute type (float, or double for
// float64), so every dtype, stride and ragged length runs the same micro-kernel.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <type_traits>

#include "attention/attention_kernel.h"
#include "common/cpu_scalar.h"
#include "common/math.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using attention::BackwardArgs;
using attention::ForwardArgs;
using attention::Inputs;
using attention::kBlockK;
using attention::kBlockQ;
using attention::kForwardBlockK;
using attention::RowStrides;
using cpu::compute_t;
using cpu::load;
using cpu::store;

// ---- the GEMM micro-kernel ------------------------------------------------------------

#if defined(FL_CPU_ISA_avx512)
constexpr int kVectorBytes = 64;
#else
constexpr int kVectorBytes = 32;  // one ymm on AVX2; the compiler splits it into xmm on the base ISA
#endif

// A GCC/Clang vector of the ISA's register width: element-wise arithmetic on it is one
// instruction, and `scalar * vector` broadcasts.
template <class T> struct Vector {
  static constexpr int kLanes = kVectorBytes / static_cast<int>(sizeof(T));
  typedef T type __attribute__((vector_size(kVectorBytes)));
};

constexpr int kRowsPerPanel = 8;       // MR: rows of C per register block
constexpr int kVectorsPerPanel = 2;    // NR = 2 vectors of columns
template <class T> constexpr int64_t kPanelCols = kVectorsPerPanel * Vector<T>::kLanes;

// By reference rather than returned: returning a 32-byte vector from a function is an
// ABI question on the base ISA (g++ -Wpsabi), though these are always inlined.
template <class V, class T> FL_INLINE void load_vector(V& v, const T* p) { std::memcpy(&v, p, sizeof(V)); }
template <class V, class T> FL_INLINE void store_vector(T* p, V v) { std::memcpy(p, &v, sizeof(V)); }

// C[M x N] = (accumulate ? C : 0) + A[M x K] B[K x N], all row-major with leading
// dimensions lda/ldb/ldc. M must be a multiple of kRowsPerPanel and N of kPanelCols:
// callers pass zero-padded tiles. Each 8 x 2-vector block of C stays in 16 registers
// over the whole K loop (8 broadcasts of A and 2 loads of B per 16 FMAs).
// C[M x N] = (accumulate ? C : 0) + A[M x K] B[K x N]; B and C row-major with leading
// dimensions ldb/ldc; A row-major (A[r * lda + k]) or, with kTransA, stored transposed
// (A[k * lda + r]), which lets a product read P^T or dS^T from the tile that holds P or
// dS. M must be a multiple of kRowsPerPanel and N of kPanelCols: callers pass padded
// tiles. Each 8 x 2-vector block of C stays in 16 registers over the whole K loop
// (8 broadcasts of A and 2 loads of B per 16 FMAs).
template <class T, bool kTransA>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T* C, int64_t ldc,
          bool accumulate) {
  using V = typename Vector<T>::type;
  constexpr int L = Vector<T>::kLanes;
  constexpr int MR = kRowsPerPanel;
  for (int64_t j0 = 0; j0 < N; j0 += kPanelCols<T>) {
    for (int64_t i0 = 0; i0 < M; i0 += MR) {
      V acc0[MR], acc1[MR];
      for (int r = 0; r < MR; ++r) {
        if (accumulate) {
          load_vector(acc0[r], C + (i0 + r) * ldc + j0);
          load_vector(acc1[r], C + (i0 + r) * ldc + j0 + L);
        } else {
          acc0[r] = V{};
          acc1[r] = V{};
        }
      }
      for (int64_t k = 0; k < K; ++k) {
        V b0, b1;
        load_vector(b0, B + k * ldb + j0);
        load_vector(b1, B + k * ldb + j0 + L);
        for (int r = 0; r < MR; ++r) {
          const T ar = kTransA ? A[k * lda + i0 + r] : A[(i0 + r) * lda + k];
          acc0[r] += ar * b0;
          acc1[r] += ar * b1;
        }
      }
      for (int r = 0; r < MR; ++r) {
        store_vector(C + (i0 + r) * ldc + j0, acc0[r]);
        store_vector(C + (i0 + r) * ldc + j0 + L, acc1[r]);
      }
    }
  }
}


FL_INLINE int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// ---- tiles ----------------------------------------------------------------------------

// One zeroed, 64-byte aligned allocation carved into tiles (per parallel chunk).
template <class T> class Workspace {
 public:
  explicit Workspace(int64_t elements) {
    const size_t bytes = static_cast<size_t>(round_up(std::max<int64_t>(elements, 1) * sizeof(T), 64));
    data_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
    if (data_) std::memset(data_.get(), 0, bytes);
  }
  bool ok() const { return data_ != nullptr; }
  T* take(int64_t elements) {
    T* p = data_.get() + used_;
    used_ += round_up(elements, 64 / sizeof(T));
    return p;
  }
  static int64_t size_of(int64_t elements) { return round_up(elements, 64 / sizeof(T)); }

 private:
  struct Free {
    void operator()(T* p) const { std::free(p); }
  };
  std::unique_ptr<T, Free> data_;
  int64_t used_ = 0;
};

// rows x cols of `src` (row stride `stride`) into dst[r * ld + c], as T.
template <class S, class T>
void copy_rows(const S* src, int64_t stride, int64_t rows, int64_t cols, T* dst, int64_t ld, T factor = T(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * stride;
    T* d = dst + r * ld;
#pragma omp simd
    for (int64_t c = 0; c < cols; ++c) d[c] = factor * T(load(s[c]));
  }
}

// The transpose, times `factor`: dst[c * ld + r] = factor * src[r][c]. Staging Q^T (or
// K^T) pre-scaled puts the softmax scale into the score GEMM at no cost.
template <class S, class T>
void copy_rows_transposed(const S* src, int64_t stride, int64_t rows, int64_t cols, T* dst, int64_t ld,
                          T factor = T(1)) {
  for (int64_t r = 0; r < rows; ++r) {
    const S* s = src + r * stride;
    for (int64_t c = 0; c < cols; ++c) dst[c * ld + r] = factor * T(load(s[c]));
  }
}

// `rows` x `cols` input rows (row stride `stride`) as a GEMM operand: read in place when
// the input already has the compute type and `in_place` says the GEMM can take them as
// they are (every row it reads exists; a B operand is read exactly its real width), else
// copied into the zero-padded `tile` (row stride `tile_ld`). Tiles of K and V were
// copied again for every block of queries, ~1/8 of the float32 forward at L = 2048.
template <class T> struct Operand {
  const T* rows;
  int64_t ld;
};

template <class S, class T>
Operand<T> operand_rows(const S* src, int64_t stride, int64_t rows, int64_t cols, bool in_place, T* tile,
                        int64_t tile_ld) {
  if constexpr (std::is_same_v<S, T>) {
    if (in_place) return {src, stride};
  }
  copy_rows(src, stride, rows, cols, tile, tile_ld);
  return {tile, tile_ld};
}

template <class T> void zero_rows(T* dst, int64_t ld, int64_t row_begin, int64_t row_end) {
  if (row_end > row_begin) std::memset(dst + row_begin * ld, 0, sizeof(T) * (row_end - row_begin) * ld);
}

template <class T> constexpr T kNegInf = -std::numeric_limits<T>::infinity();


// The logits of one tile row of (already scaled) scores in place: s[j] += mask(i, j0 + j),
// -inf where causality hides key j0 + j from query i.
template <class S, class T>
FL_INLINE void logits_row(const Inputs& in, const S* mask_row, int64_t i, int64_t j0, int64_t count, T* s) {
  if (mask_row) {
    const int64_t mj = in.mask_strides[3];
    if (mj == 1) {
#pragma omp simd
      for (int64_t j = 0; j < count; ++j) s[j] += T(load(mask_row[j0 + j]));
    } else {
      for (int64_t j = 0; j < count; ++j) s[j] += T(load(mask_row[(j0 + j) * mj]));
    }
  }
  if (in.causal && j0 + count - 1 > i) {
    for (int64_t j = std::max<int64_t>(0, i + 1 - j0); j < count; ++j) s[j] = kNegInf<T>;
  }
}

template <class S>
const S* mask_row_ptr(const Inputs& in, int64_t b, int64_t h, int64_t i) {
  if (!in.mask) return nullptr;
  const int64_t* ms = in.mask_strides;
  return static_cast<const S*>(in.mask) + b * ms[0] + h * ms[1] + i * ms[2];
}

// The key range query rows [i0, i0 + rows) can see.
FL_INLINE int64_t visible_keys(const Inputs& in, int64_t i0, int64_t rows) {
  return in.causal ? std::min(in.shape.kv_len, i0 + rows) : in.shape.kv_len;
}

// Logits of one row of S^T (key j against queries i0 .. i0 + count, scores already
// scaled) in place: s[r] += mask(i0 + r, j), -inf where causality hides key j from
// query i0 + r.
template <class S, class T>
FL_INLINE void logits_column(const Inputs& in, const S* mask_column, int64_t i0, int64_t j, int64_t count, T* s) {
  if (mask_column) {
    const int64_t mi = in.mask_strides[2];
    for (int64_t r = 0; r < count; ++r) s[r] += T(load(mask_column[r * mi]));
  }
  if (in.causal) {  // query i0 + r sees key j iff r >= j - i0
    const int64_t hidden = std::min(count, std::max<int64_t>(0, j - i0));
    for (int64_t r = 0; r < hidden; ++r) s[r] = kNegInf<T>;
  }
}

// mask(i0, j) for the column walk above, or null.
template <class S>
const S* mask_column_ptr(const Inputs& in, int64_t b, int64_t h, int64_t i0, int64_t j) {
  if (!in.mask) return nullptr;
  const int64_t* ms = in.mask_strides;
  return static_cast<const S*>(in.mask) + b * ms[0] + h * ms[1] + i0 * ms[2] + j * ms[3];
}

// Block order within a head: 0, n-1, 1, n-2, ... With causal masking the work per block
// grows along the sequence; at::parallel_for hands out contiguous unit ranges, so this
// order gives every thread a mix of short and long blocks.
FL_INLINE int64_t zigzag(int64_t u, int64_t n) { return u % 2 == 0 ? u / 2 : n - 1 - u / 2; }

// Head sizes of one call as the tiles see them: dims padded to the GEMM's panel width.
template <class T> struct HeadDims {
  int64_t E, Ev, Ep, Evp;
  int64_t group;  // query heads per kv head
  T scale;
  explicit HeadDims(const Inputs& in)
      : E(in.shape.head_dim),
        Ev(in.shape.value_dim),
        Ep(round_up(E, kPanelCols<T>)),
        Evp(round_up(Ev, kPanelCols<T>)),
        group(in.shape.heads / in.shape.kv_heads),
        scale(T(in.scale)) {}
};

// The (batch, head, block of kBlockQ query rows) of a forward or dQ unit, blocks in
// zigzag order within a head; nq rows, padded to Mq (GEMM rows) and Nq (GEMM columns).
template <class T> struct QueryBlock {
  int64_t bh, b, h, hk, i0, nq, Mq, Nq;
  QueryBlock(const attention::Shape& sh, int64_t group, int64_t unit) {
    const int64_t q_blocks = attention::ceil_div(sh.q_len, kBlockQ);
    bh = unit / q_blocks;
    b = bh / sh.heads;
    h = bh % sh.heads;
    hk = h / group;
    i0 = zigzag(unit % q_blocks, q_blocks) * kBlockQ;
    nq = std::min(kBlockQ, sh.q_len - i0);
    Mq = round_up(nq, kRowsPerPanel);
    Nq = round_up(nq, kPanelCols<T>);
  }
};

// The dropout factors (keep_scale or 0) of query rows i0 .. i0 + nq and keys j0 .. j0 + nk
// (j0 a multiple of 4) of slice bh: f[c * ld + r] (kKeyMajor, the S^T layout) or
// f[r * ld + c]. Up to round_up(nk, 4) keys are written (one Philox call per 4 keys), so
// the tile must hold that many.
template <class T, bool kKeyMajor>
void dropout_factors(const attention::DropoutParams& d, int64_t bh, int64_t i0, int64_t nq, int64_t j0, int64_t nk,
                     T* f, int64_t ld) {
  const T kept = T(d.keep_scale);
  const int64_t quads = attention::ceil_div(nk, 4), quad0 = j0 / 4;
  if (kKeyMajor) {
    for (int64_t q = 0; q < quads; ++q) {
      T* f0 = f + 4 * q * ld;
#pragma omp simd
      for (int64_t r = 0; r < nq; ++r) {
        const attention::Philox4 w = attention::dropout_words(d, bh, i0 + r, quad0 + q);
        f0[r] = attention::dropout_keeps(d, w.x[0]) ? kept : T(0);
        f0[ld + r] = attention::dropout_keeps(d, w.x[1]) ? kept : T(0);
        f0[2 * ld + r] = attention::dropout_keeps(d, w.x[2]) ? kept : T(0);
        f0[3 * ld + r] = attention::dropout_keeps(d, w.x[3]) ? kept : T(0);
      }
    }
  } else {
    for (int64_t r = 0; r < nq; ++r) {
      T* fr = f + r * ld;
#pragma omp simd
      for (int64_t q = 0; q < quads; ++q) {
        const attention::Philox4 w = attention::dropout_words(d, bh, i0 + r, quad0 + q);
        fr[4 * q] = attention::dropout_keeps(d, w.x[0]) ? kept : T(0);
        fr[4 * q + 1] = attention::dropout_keeps(d, w.x[1]) ? kept : T(0);
        fr[4 * q + 2] = attention::dropout_keeps(d, w.x[2]) ? kept : T(0);
        fr[4 * q + 3] = attention::dropout_keeps(d, w.x[3]) ? kept : T(0);
      }
    }
  }
}

// new_max[r] = the maximum of prev_max[r] and column r of the rows x kBlockQ tile `s`
// (s[k * ld + r]), for all kBlockQ columns (those past the block's queries hold stale
// values and are never read); NaN if any entry is NaN (a plain max would drop it), so a
// NaN score makes its row NaN, as in torch, instead of being skipped. All columns'
// registers advance together, so the max chains run side by side; NaN is tracked
// apart from them.
template <class T>
void column_max(const T* s, int64_t ld, int64_t rows, const T* prev_max, T* new_max) {
  using V = typename Vector<T>::type;
  using Mask = decltype(V{} != V{});
  constexpr int L = Vector<T>::kLanes;
  constexpr int kChunks = static_cast<int>(kBlockQ / L);
  V m[kChunks];
  Mask nan[kChunks];
  for (int c = 0; c < kChunks; ++c) {
    load_vector(m[c], prev_max + c * L);
    nan[c] = Mask{};
  }
  for (int64_t k = 0; k < rows; ++k) {
    for (int c = 0; c < kChunks; ++c) {
      V x;
      load_vector(x, s + k * ld + c * L);
      m[c] = x > m[c] ? x : m[c];
      nan[c] |= x != x;
    }
  }
  const V quiet_nan = V{} + std::numeric_limits<T>::quiet_NaN();
  for (int c = 0; c < kChunks; ++c) store_vector(new_max + c * L, nan[c] ? quiet_nan : m[c]);
}

// P^T = exp(S^T - shift) in place over `rows` keys of the tile (s[k * ld + r]) and
// sum[r] = the sum over those keys, for query columns 0 .. round_up(nq, kLanes): one
// vector of queries at a time, its shift and sum held in registers down the keys (the
// plain loop over the tile reloaded and stored the sums for every key). Columns past
// nq hold stale values and are never read.
template <class T>
void exp_columns(T* s, int64_t ld, int64_t rows, int64_t nq, const T* shift, T* sum) {
  constexpr int L = Vector<T>::kLanes;
  for (int64_t r0 = 0; r0 < nq; r0 += L) {
    // Plain element loops (no memcpy): whole-vector accesses only, so the two arrays
    // live in registers. An addressed, vector-aligned local array would sit on ASan's
    // fake stack, which GCC 12 aligns to less than the 64 bytes its vmovdqa64 needs.
    T shift_chunk[L], acc[L];
#pragma omp simd
    for (int r = 0; r < L; ++r) {
      shift_chunk[r] = shift[r0 + r];
      acc[r] = T(0);
    }
    for (int64_t k = 0; k < rows; ++k) {
      T* row = s + k * ld + r0;
#pragma omp simd
      for (int r = 0; r < L; ++r) {
        const T p = math::exp_nonpositive(row[r] - shift_chunk[r]);
        row[r] = p;
        acc[r] += p;
      }
    }
#pragma omp simd
    for (int r = 0; r < L; ++r) sum[r0 + r] = acc[r];
  }
}

// ---- forward ----------------------------------------------------------------------------

// The forward works on S^T (keys x queries): Q^T is transposed once per unit, K and V
// tiles are plain row copies, the online softmax runs down the columns (vectorized over
// queries), and O += P V reads P from S^T through the transposed-A GEMM.
template <class S>
void forward_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const Inputs& in = args.in;
  const auto& sh = in.shape;
  const HeadDims<T> dims(in);
  const int64_t E = dims.E, Ev = dims.Ev, Ep = dims.Ep, Evp = dims.Evp;
  const T scale = dims.scale;

  using W = Workspace<T>;
  W ws(W::size_of(E * kBlockQ) + W::size_of(kForwardBlockK * Ep) + W::size_of(kForwardBlockK * Evp) +
       W::size_of(kForwardBlockK * kBlockQ) + W::size_of(kBlockQ * Evp) + 6 * W::size_of(kBlockQ) +
       (in.dropout.enabled ? W::size_of(kForwardBlockK * kBlockQ) : 0));
  if (!ws.ok()) throw std::bad_alloc();
  T* qt_tile = ws.take(E * kBlockQ);               // Q^T [E][queries]
  T* k_tile = ws.take(kForwardBlockK * Ep);        // K [keys][Ep]
  T* v_tile = ws.take(kForwardBlockK * Evp);       // V [keys][Evp]
  T* st_tile = ws.take(kForwardBlockK * kBlockQ);  // S^T, then P^T
  T* o_acc = ws.take(kBlockQ * Evp);               // unnormalized O
  T* row_max = ws.take(kBlockQ);
  T* row_sum = ws.take(kBlockQ);
  T* new_max = ws.take(kBlockQ);
  T* tile_sum = ws.take(kBlockQ);
  T* alpha = ws.take(kBlockQ);
  T* shift = ws.take(kBlockQ);  // the row maximum, 0 for a row that has seen no key
  T* drop_tile = in.dropout.enabled ? ws.take(kForwardBlockK * kBlockQ) : nullptr;  // dropout factors [keys][queries]

  const S* query = static_cast<const S*>(in.query);
  const S* key = static_cast<const S*>(in.key);
  const S* value = static_cast<const S*>(in.value);
  S* output = static_cast<S*>(args.output);
  T* lse = static_cast<T*>(args.logsumexp);

  for (int64_t unit = begin; unit < end; ++unit) {
    const QueryBlock<T> blk(sh, dims.group, unit);
    const int64_t bh = blk.bh, b = blk.b, h = blk.h, hk = blk.hk, i0 = blk.i0, nq = blk.nq, Mq = blk.Mq, Nq = blk.Nq;

    copy_rows_transposed(query + b * in.q.batch + h * in.q.head + i0 * in.q.row, in.q.row, nq, E, qt_tile, kBlockQ,
                         scale);
    std::memset(o_acc, 0, sizeof(T) * Mq * Evp);
    for (int64_t r = 0; r < nq; ++r) {
      row_max[r] = kNegInf<T>;
      row_sum[r] = T(0);
    }
    const S* k_head = key + b * in.k.batch + hk * in.k.head;
    const S* v_head = value + b * in.v.batch + hk * in.v.head;
    const int64_t kv_end = visible_keys(in, i0, nq);

    for (int64_t j0 = 0; j0 < kv_end; j0 += kForwardBlockK) {
      const int64_t nk = std::min(kForwardBlockK, kv_end - j0);
      const int64_t Mk = round_up(nk, kRowsPerPanel);
      // K is read Mk rows deep (A of S^T), V exactly Evp wide (B of P V).
      const Operand<T> k_rows = operand_rows(k_head + j0 * in.k.row, in.k.row, nk, E, j0 + Mk <= sh.kv_len, k_tile, Ep);
      const Operand<T> v_rows = operand_rows(v_head + j0 * in.v.row, in.v.row, nk, Ev, Ev == Evp, v_tile, Evp);
      // Rows nk..Mk of S^T come from stale or later K rows and are never read below.
      gemm<T, false>(Mk, Nq, E, k_rows.rows, k_rows.ld, qt_tile, kBlockQ, st_tile, kBlockQ, false);

      if (in.mask || in.causal) {
        for (int64_t c = 0; c < nk; ++c) {
          logits_column<S, T>(in, mask_column_ptr<S>(in, b, h, i0, j0 + c), i0, j0 + c, nq, st_tile + c * kBlockQ);
        }
      }
      column_max(st_tile, kBlockQ, nk, row_max, new_max);
#pragma omp simd
      for (int64_t r = 0; r < nq; ++r) {
        // A row that has seen no key yet keeps m = -inf, l = 0, O = 0 and gets P = 0:
        // its logits are all -inf, so shifting them by 0 instead of m gives exp = 0.
        const bool unseen = new_max[r] == kNegInf<T>;
        alpha[r] = unseen ? T(1) : math::exp_nonpositive(row_max[r] - new_max[r]);
        shift[r] = unseen ? T(0) : new_max[r];
        tile_sum[r] = T(0);
      }
      exp_columns(st_tile, kBlockQ, nk, nq, shift, tile_sum);
      for (int64_t r = 0; r < nq; ++r) {
        row_sum[r] = row_sum[r] * alpha[r] + tile_sum[r];
        row_max[r] = new_max[r];
        if (alpha[r] != T(1)) {
          T* o = o_acc + r * Evp;
#pragma omp simd
          for (int64_t c = 0; c < Ev; ++c) o[c] *= alpha[r];
        }
      }
      if (drop_tile) {  // the row sums above keep every P: dropout acts after the softmax
        dropout_factors<T, true>(in.dropout, bh, i0, nq, j0, nk, drop_tile, kBlockQ);
        for (int64_t c = 0; c < nk; ++c) {
          T* s = st_tile + c * kBlockQ;
          const T* f = drop_tile + c * kBlockQ;
#pragma omp simd
          for (int64_t r = 0; r < nq; ++r) s[r] *= f[r];
        }
      }
      // O += P V; P's columns nq..Mq (stale) only feed O rows that are never written out.
      gemm<T, true>(Mq, Evp, nk, st_tile, kBlockQ, v_rows.rows, v_rows.ld, o_acc, Evp, true);
    }

    S* out = output + ((b * sh.heads + h) * sh.q_len + i0) * Ev;
    T* lse_out = lse + (b * sh.heads + h) * sh.q_len + i0;
    for (int64_t r = 0; r < nq; ++r) {
      const T l = row_sum[r];
      // A row that sees no key (fully masked, or Lk == 0) has l == 0 and gives 0, as
      // torch's SDPA does; any visible key adds exp(0) = 1 for the row's maximum.
      const T inv = l == T(0) ? T(0) : T(1) / l;
      const T* o = o_acc + r * Evp;
#pragma omp simd
      for (int64_t c = 0; c < Ev; ++c) out[r * Ev + c] = store<S>(o[c] * inv);
      lse_out[r] = l == T(0) ? kNegInf<T> : row_max[r] + std::log(l);
    }
  }
}

// ---- backward -------------------------------------------------------------------------

template <class S>
void row_dot_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const auto& sh = args.in.shape;
  const int64_t Ev = sh.value_dim;
  const S* grad_out = static_cast<const S*>(args.grad_output);
  const S* out = static_cast<const S*>(args.output);
  T* dot = static_cast<T*>(args.row_dot);
  const RowStrides& gs = args.grad_output_strides;
  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t b = unit / sh.heads, h = unit % sh.heads;
    for (int64_t i = 0; i < sh.q_len; ++i) {
      const S* g = grad_out + b * gs.batch + h * gs.head + i * gs.row;
      const S* o = out + (unit * sh.q_len + i) * Ev;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t c = 0; c < Ev; ++c) sum += T(load(g[c])) * T(load(o[c]));
      dot[unit * sh.q_len + i] = sum;
    }
  }
}

// P = exp(s - lse) and dS = P * (dP - D) in place (s becomes P, dp becomes dS) for one
// row of S and dP, whose query has logsumexp `lse` and D = `dot`. A row with lse ==
// -inf saw no key: its P (and gradient) is 0, as in the forward.
template <class T>
FL_INLINE void probabilities_and_grad_row(int64_t count, T* s, T* dp, T lse, T dot) {
  if (lse == kNegInf<T>) {
#pragma omp simd
    for (int64_t x = 0; x < count; ++x) {
      s[x] = T(0);
      dp[x] = T(0) * (dp[x] - dot);  // NaN stays NaN, as in probabilities_and_grad_column
    }
    return;
  }
  // Scalars, not pointers: GCC does not vectorize this loop when lse and D are loads
  // that the stores to s and dp might alias (scalar code was 3x slower in the backward).
#pragma omp simd
  for (int64_t x = 0; x < count; ++x) {
    const T p = math::exp_nonpositive(s[x] - lse);
    s[x] = p;
    dp[x] = p * (dp[x] - dot);
  }
}

// With dropout factors f: s becomes P f (for dV) and dp becomes dS = P (dP f - D).
template <class T>
FL_INLINE void probabilities_and_grad_row_dropout(int64_t count, T* s, T* dp, const T* f, T lse, T dot) {
  if (lse == kNegInf<T>) {
#pragma omp simd
    for (int64_t x = 0; x < count; ++x) {
      s[x] = T(0);
      dp[x] = T(0) * (dp[x] * f[x] - dot);
    }
    return;
  }
#pragma omp simd
  for (int64_t x = 0; x < count; ++x) {
    const T p = math::exp_nonpositive(s[x] - lse);
    s[x] = p * f[x];
    dp[x] = p * (dp[x] * f[x] - dot);
  }
}

// The same for one row of S^T and dP^T (one key against `count` queries with their own
// logsumexp and D).
// With dropout factors f (null: none), dp becomes P (dP f - D); only dS is used here.
template <class T>
FL_INLINE void probabilities_and_grad_column(int64_t count, T* __restrict s, T* __restrict dp,
                                             const T* __restrict lse, const T* __restrict dot,
                                             const T* __restrict f) {
  if (f) {
#pragma omp simd
    for (int64_t x = 0; x < count; ++x) {
      const T l = lse[x];
      const T p = l == kNegInf<T> ? T(0) : math::exp_nonpositive(s[x] - l);
      s[x] = p;
      dp[x] = p * (dp[x] * f[x] - dot[x]);
    }
    return;
  }
#pragma omp simd
  for (int64_t x = 0; x < count; ++x) {
    const T l = lse[x];
    const T p = l == kNegInf<T> ? T(0) : math::exp_nonpositive(s[x] - l);
    s[x] = p;
    dp[x] = p * (dp[x] - dot[x]);
  }
}

// dK, dV for one key block (the unit): K^T and V^T are transposed once per unit; each
// query block gives S = (scale Q) K^T and dP = dO V^T in row layout, then dV += P^T dO
// and dK += dS^T (scale Q) read P and dS transposed.
//
// With args.grad_query_accumulator set (the fused backward), a unit is one (batch, kv
// head) instead: it walks its key blocks in order and also adds dS K into the dQ
// accumulator of its query heads, which no other unit touches. Every sum then runs in
// the same order as in the split passes (dQ over key blocks in order, the same products
// with Q pre-scaled on both sides), so both give the same bits.
template <class S>
void key_value_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const Inputs& in = args.in;
  const auto& sh = in.shape;
  const HeadDims<T> dims(in);
  const int64_t E = dims.E, Ev = dims.Ev, Ep = dims.Ep, Evp = dims.Evp, group = dims.group;
  const T scale = dims.scale;
  const int64_t k_blocks = attention::ceil_div(sh.kv_len, kBlockK);
  T* dq_accumulator = static_cast<T*>(args.grad_query_accumulator);
  const bool fused = dq_accumulator != nullptr;
  const int64_t q_rows_padded = attention::ceil_div(sh.q_len, kBlockQ) * kBlockQ;
  const int64_t ldq = args.grad_query_accumulator_ld;

  using W = Workspace<T>;
  W ws(W::size_of(E * kBlockK) + W::size_of(Ev * kBlockK) + W::size_of(kBlockQ * Ep) +
       W::size_of(kBlockQ * Evp) + 2 * W::size_of(kBlockQ * kBlockK) + W::size_of(kBlockK * Ep) +
       W::size_of(kBlockK * Evp) + (fused ? W::size_of(kBlockK * Ep) : 0) +
       (in.dropout.enabled ? W::size_of(kBlockQ * kBlockK) : 0));
  if (!ws.ok()) throw std::bad_alloc();
  T* kt_tile = ws.take(E * kBlockK);       // K^T [E][keys]
  T* vt_tile = ws.take(Ev * kBlockK);      // V^T [Ev][keys]
  T* q_tile = ws.take(kBlockQ * Ep);       // scale * Q [queries][Ep]
  T* do_tile = ws.take(kBlockQ * Evp);     // dO [queries][Evp]
  T* s_tile = ws.take(kBlockQ * kBlockK);  // S, then P
  T* dp_tile = ws.take(kBlockQ * kBlockK); // dP, then dS
  T* dk_acc = ws.take(kBlockK * Ep);
  T* dv_acc = ws.take(kBlockK * Evp);
  T* k_tile = fused ? ws.take(kBlockK * Ep) : nullptr;  // K [keys][Ep], for dQ += dS K
  T* drop_tile = in.dropout.enabled ? ws.take(kBlockQ * kBlockK) : nullptr;  // dropout factors [queries][keys]

  const S* query = static_cast<const S*>(in.query);
  const S* key = static_cast<const S*>(in.key);
  const S* value = static_cast<const S*>(in.value);
  const S* grad_out = static_cast<const S*>(args.grad_output);
  const RowStrides& gs = args.grad_output_strides;
  const T* lse = static_cast<const T*>(args.logsumexp);
  const T* dot = static_cast<const T*>(args.row_dot);
  S* grad_key = static_cast<S*>(args.grad_key);
  S* grad_value = static_cast<S*>(args.grad_value);

  for (int64_t unit = begin; unit < end; ++unit) {
    const int64_t bhk = fused ? unit : unit / k_blocks;
    const int64_t b = bhk / sh.kv_heads, hk = bhk % sh.kv_heads;
    for (int64_t block = 0; block < (fused ? k_blocks : 1); ++block) {
      const int64_t j0 = (fused ? block : zigzag(unit % k_blocks, k_blocks)) * kBlockK;
      const int64_t nk = std::min(kBlockK, sh.kv_len - j0);
      const int64_t Mk = round_up(nk, kRowsPerPanel);
      const int64_t Nk = round_up(nk, kPanelCols<T>);
      const S* k_rows = key + b * in.k.batch + hk * in.k.head + j0 * in.k.row;

      copy_rows_transposed(k_rows, in.k.row, nk, E, kt_tile, kBlockK);
      copy_rows_transposed(value + b * in.v.batch + hk * in.v.head + j0 * in.v.row, in.v.row, nk, Ev, vt_tile,
                           kBlockK);
      if (fused) copy_rows(k_rows, in.k.row, nk, E, k_tile, Ep);
      std::memset(dk_acc, 0, sizeof(T) * Mk * Ep);
      std::memset(dv_acc, 0, sizeof(T) * Mk * Evp);
      // Causal: query i sees key j iff j <= i, so rows before j0 see none of this block.
      const int64_t first_block = in.causal ? j0 / kBlockQ : 0;

      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t bh = b * sh.heads + h;
        for (int64_t i0 = first_block * kBlockQ; i0 < sh.q_len; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, sh.q_len - i0);
          const int64_t Mq = round_up(nq, kRowsPerPanel);
          copy_rows(query + b * in.q.batch + h * in.q.head + i0 * in.q.row, in.q.row, nq, E, q_tile, Ep, scale);
          // dO serves as A of dP (Mq rows deep) and B of dV (Evp wide).
          const Operand<T> do_rows = operand_rows(grad_out + b * gs.batch + h * gs.head + i0 * gs.row, gs.row, nq, Ev,
                                                  Ev == Evp && i0 + Mq <= sh.q_len, do_tile, Evp);
          // Rows nq..Mq (stale or later Q, dO) give S, dP rows that only feed dQ padding rows.
          gemm<T, false>(Mq, Nk, E, q_tile, Ep, kt_tile, kBlockK, s_tile, kBlockK, false);     // S
          gemm<T, false>(Mq, Nk, Ev, do_rows.rows, do_rows.ld, vt_tile, kBlockK, dp_tile, kBlockK, false); // dP
          const T* lse_rows = lse + bh * sh.q_len + i0;
          const T* dot_rows = dot + bh * sh.q_len + i0;
          if (drop_tile) dropout_factors<T, false>(in.dropout, bh, i0, nq, j0, nk, drop_tile, kBlockK);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t i = i0 + r;
            T* s = s_tile + r * kBlockK;
            logits_row<S, T>(in, mask_row_ptr<S>(in, b, h, i), i, j0, nk, s);
            if (drop_tile) {
              probabilities_and_grad_row_dropout(nk, s, dp_tile + r * kBlockK, drop_tile + r * kBlockK, lse_rows[r],
                                                 dot_rows[r]);
            } else {
              probabilities_and_grad_row(nk, s, dp_tile + r * kBlockK, lse_rows[r], dot_rows[r]);
            }
          }
          // P and dS columns nk..Mk (unprocessed) only feed dK/dV rows that are never written out.
          gemm<T, true>(Mk, Evp, nq, s_tile, kBlockK, do_rows.rows, do_rows.ld, dv_acc, Evp, true);  // dV += P^T dO
          gemm<T, true>(Mk, Ep, nq, dp_tile, kBlockK, q_tile, Ep, dk_acc, Ep, true);     // dK += dS^T (scale Q)
          if (fused) {  // dQ += dS K; rows nq..Mq land in the accumulator's padding rows
            gemm<T, false>(Mq, Ep, nk, dp_tile, kBlockK, k_tile, Ep, dq_accumulator + (bh * q_rows_padded + i0) * ldq,
                           ldq, true);
          }
        }
      }

      S* dk = grad_key + ((b * sh.kv_heads + hk) * sh.kv_len + j0) * E;
      S* dv = grad_value + ((b * sh.kv_heads + hk) * sh.kv_len + j0) * Ev;
      for (int64_t c = 0; c < nk; ++c) {
#pragma omp simd
        for (int64_t e = 0; e < E; ++e) dk[c * E + e] = store<S>(dk_acc[c * Ep + e]);
#pragma omp simd
        for (int64_t e = 0; e < Ev; ++e) dv[c * Ev + e] = store<S>(dv_acc[c * Evp + e]);
      }
    }

    if (fused) {
      S* grad_query = static_cast<S*>(args.grad_query);
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const int64_t bh = b * sh.heads + h;
        for (int64_t i = 0; i < sh.q_len; ++i) {
          const T* acc = dq_accumulator + (bh * q_rows_padded + i) * ldq;
          S* dq = grad_query + (bh * sh.q_len + i) * E;
#pragma omp simd
          for (int64_t e = 0; e < E; ++e) dq[e] = store<S>(acc[e] * scale);
        }
      }
    }
  }
}

// dQ for one query block (the unit): Q^T and dO^T are transposed once per unit; each key
// block gives S^T = K Q^T and dP^T = V dO^T, then dQ += dS K reads dS from dS^T.
template <class S>
void query_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const Inputs& in = args.in;
  const auto& sh = in.shape;
  const HeadDims<T> dims(in);
  const int64_t E = dims.E, Ev = dims.Ev, Ep = dims.Ep, Evp = dims.Evp;
  const T scale = dims.scale;

  using W = Workspace<T>;
  W ws(W::size_of(E * kBlockQ) + W::size_of(Ev * kBlockQ) + W::size_of(kBlockK * Ep) +
       W::size_of(kBlockK * Evp) + 2 * W::size_of(kBlockK * kBlockQ) + W::size_of(kBlockQ * Ep) +
       (in.dropout.enabled ? W::size_of(kBlockK * kBlockQ) : 0));
  if (!ws.ok()) throw std::bad_alloc();
  T* qt_tile = ws.take(E * kBlockQ);        // Q^T [E][queries]
  T* dot_tile = ws.take(Ev * kBlockQ);      // dO^T [Ev][queries]
  T* k_tile = ws.take(kBlockK * Ep);        // K [keys][Ep]
  T* v_tile = ws.take(kBlockK * Evp);       // V [keys][Evp]
  T* st_tile = ws.take(kBlockK * kBlockQ);  // S^T, then P^T
  T* dpt_tile = ws.take(kBlockK * kBlockQ); // dP^T, then dS^T
  T* dq_acc = ws.take(kBlockQ * Ep);
  T* drop_tile = in.dropout.enabled ? ws.take(kBlockK * kBlockQ) : nullptr;  // dropout factors [keys][queries]

  const S* query = static_cast<const S*>(in.query);
  const S* key = static_cast<const S*>(in.key);
  const S* value = static_cast<const S*>(in.value);
  const S* grad_out = static_cast<const S*>(args.grad_output);
  const RowStrides& gs = args.grad_output_strides;
  const T* lse = static_cast<const T*>(args.logsumexp);
  const T* dot = static_cast<const T*>(args.row_dot);
  S* grad_query = static_cast<S*>(args.grad_query);

  for (int64_t unit = begin; unit < end; ++unit) {
    const QueryBlock<T> blk(sh, dims.group, unit);
    const int64_t bh = blk.bh, b = blk.b, h = blk.h, hk = blk.hk, i0 = blk.i0, nq = blk.nq, Mq = blk.Mq, Nq = blk.Nq;

    copy_rows_transposed(query + b * in.q.batch + h * in.q.head + i0 * in.q.row, in.q.row, nq, E, qt_tile, kBlockQ,
                         scale);
    copy_rows_transposed(grad_out + b * gs.batch + h * gs.head + i0 * gs.row, gs.row, nq, Ev, dot_tile, kBlockQ);
    std::memset(dq_acc, 0, sizeof(T) * Mq * Ep);
    const S* k_head = key + b * in.k.batch + hk * in.k.head;
    const S* v_head = value + b * in.v.batch + hk * in.v.head;
    const T* lse_rows = lse + bh * sh.q_len + i0;
    const T* dot_rows = dot + bh * sh.q_len + i0;
    const int64_t kv_end = visible_keys(in, i0, nq);

    for (int64_t j0 = 0; j0 < kv_end; j0 += kBlockK) {
      const int64_t nk = std::min(kBlockK, kv_end - j0);
      const int64_t Mk = round_up(nk, kRowsPerPanel);
      // K serves as A of S^T (Mk rows deep) and B of dQ (Ep wide); V as A of dP^T.
      const bool rows_exist = j0 + Mk <= sh.kv_len;
      const Operand<T> k_rows =
          operand_rows(k_head + j0 * in.k.row, in.k.row, nk, E, rows_exist && E == Ep, k_tile, Ep);
      const Operand<T> v_rows = operand_rows(v_head + j0 * in.v.row, in.v.row, nk, Ev, rows_exist, v_tile, Evp);
      // Rows nk..Mk (stale or later K, V) give S^T, dP^T rows that no product below reads.
      gemm<T, false>(Mk, Nq, E, k_rows.rows, k_rows.ld, qt_tile, kBlockQ, st_tile, kBlockQ, false);     // S^T
      gemm<T, false>(Mk, Nq, Ev, v_rows.rows, v_rows.ld, dot_tile, kBlockQ, dpt_tile, kBlockQ, false); // dP^T
      if (drop_tile) dropout_factors<T, true>(in.dropout, bh, i0, nq, j0, nk, drop_tile, kBlockQ);
      for (int64_t c = 0; c < nk; ++c) {
        T* s = st_tile + c * kBlockQ;
        logits_column<S, T>(in, mask_column_ptr<S>(in, b, h, i0, j0 + c), i0, j0 + c, nq, s);
        probabilities_and_grad_column(nq, s, dpt_tile + c * kBlockQ, lse_rows, dot_rows,
                                      drop_tile ? drop_tile + c * kBlockQ : nullptr);
      }
      // dS columns nq..Mq (unprocessed) only feed dQ rows that are never written out.
      gemm<T, true>(Mq, Ep, nk, dpt_tile, kBlockQ, k_rows.rows, k_rows.ld, dq_acc, Ep, true);  // dQ += dS K
    }

    S* dq = grad_query + (bh * sh.q_len + i0) * E;
    for (int64_t r = 0; r < nq; ++r) {
#pragma omp simd
      for (int64_t e = 0; e < E; ++e) dq[r * E + e] = store<S>(dq_acc[r * Ep + e] * scale);
    }
  }
}


template <class Args, template <class> class Body>
void dispatch(const Args& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.in.dtype, [&](auto storage) { Body<decltype(storage)>::run(args, begin, end); });
}

template <class S> struct ForwardBody {
  static void run(const ForwardArgs& a, int64_t b, int64_t e) { forward_typed<S>(a, b, e); }
};
template <class S> struct RowDotBody {
  static void run(const BackwardArgs& a, int64_t b, int64_t e) { row_dot_typed<S>(a, b, e); }
};
template <class S> struct KeyValueBody {
  static void run(const BackwardArgs& a, int64_t b, int64_t e) { key_value_typed<S>(a, b, e); }
};
template <class S> struct QueryBody {
  static void run(const BackwardArgs& a, int64_t b, int64_t e) { query_typed<S>(a, b, e); }
};

void forward(const ForwardArgs& a, int64_t b, int64_t e) { dispatch<ForwardArgs, ForwardBody>(a, b, e); }
void backward_row_dot(const BackwardArgs& a, int64_t b, int64_t e) { dispatch<BackwardArgs, RowDotBody>(a, b, e); }
void backward_key_value(const BackwardArgs& a, int64_t b, int64_t e) {
  dispatch<BackwardArgs, KeyValueBody>(a, b, e);
}
void backward_query(const BackwardArgs& a, int64_t b, int64_t e) { dispatch<BackwardArgs, QueryBody>(a, b, e); }

}  // namespace

extern const attention::CpuKernels attention_cpu_kernels;
const attention::CpuKernels attention_cpu_kernels = {&forward, &backward_row_dot, &backward_key_value,
                                                      &backward_query};

}  // namespace fastlayers::FL_CPU_NS

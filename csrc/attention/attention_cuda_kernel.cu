// Flash-attention CUDA kernels (SIMT, every dtype; compute in float, double for
// float64). They include no torch headers: attention_cuda.cpp checks, allocates and
// passes the current stream.
//
// The FlashAttention-2 structure: the forward and dQ kernels own a block of query rows
// (R rows per warp, kWarps warps) and stream tiles of kTile = 32 keys through shared
// memory; the dK/dV kernel owns a block of keys and streams tiles of 32 query rows. In
// every kernel lane l first computes the dot products of the warp's row with tile row
// l (scores, dP), then the warp accumulates its rows' outputs with lane l owning
// columns l, l + 32, ... (up to kChunks * 32 = head dims up to 256). The softmax is
// online (running max and sum) in the forward; the backward recomputes P from the
// logsumexp and uses D = rowsum(dO * O). No atomics: the result is deterministic.
// Dropout (dropout.h, the CPU kernels' mask bit for bit): each lane regenerates the
// factor of its (query, key) element.
#include <cuda_runtime.h>

#include <algorithm>

#include "attention/attention_kernel.h"
#include "common/cuda_scalar.cuh"
#include "common/math.h"

namespace fastlayers::attention {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTile = 32;
constexpr unsigned kFullMask = 0xffffffffu;

using cuda::Compute;
using cuda::from_compute;
using cuda::to_compute;

template <class T> __device__ __forceinline__ T neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return __int_as_float(0xff800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return __longlong_as_double(0xfff0000000000000LL); }

__device__ __forceinline__ int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// max that keeps a NaN (fmax would drop it), so a NaN score makes its row NaN, as in torch.
template <class T> __device__ __forceinline__ T max_keep_nan(T a, T b) { return (b > a || b != b) ? b : a; }

// The dropout factor of element (i, j) of slice bh: 1 without dropout, else keep_scale or 0.
template <class T> __device__ __forceinline__ T dropout_factor(const DropoutParams& d, int64_t bh, int64_t i, int64_t j) {
  if (!d.enabled) return T(1);
  const Philox4 w = dropout_words(d, bh, i, j >> 2);
  return dropout_keeps(d, w.x[j & 3]) ? T(d.keep_scale) : T(0);
}

template <class T> __device__ __forceinline__ T warp_max(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = max_keep_nan(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}
template <class T> __device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// rows x cols of a strided source into shared memory (row stride ld), cast to T.
template <class S, class T>
__device__ __forceinline__ void stage_rows(const S* src, int64_t stride, int rows, int cols, T* dst, int ld) {
  for (int idx = threadIdx.x; idx < rows * cols; idx += kThreads) {
    const int r = idx / cols, c = idx - r * cols;
    dst[r * ld + c] = to_compute(src[r * stride + c]);
  }
}

template <class T> __device__ __forceinline__ T dot(const T* a, const T* b, int n) {
  T acc = 0;
  for (int e = 0; e < n; ++e) acc += a[e] * b[e];
  return acc;
}

// scale * s + mask(i, j), -inf where causality hides key j from query i.
template <class S, class T>
__device__ __forceinline__ T logit(const Inputs& in, T s, int64_t b, int64_t h, int64_t i, int64_t j) {
  s *= T(in.scale);
  if (in.mask) {
    const int64_t* ms = in.mask_strides;
    s += to_compute(static_cast<const S*>(in.mask)[b * ms[0] + h * ms[1] + i * ms[2] + j * ms[3]]);
  }
  return in.causal && j > i ? neg_inf<T>() : s;
}

// ---- forward ----------------------------------------------------------------------------

template <class S, int R, int C>
__global__ void __launch_bounds__(kThreads) forward_kernel(ForwardArgs args) {
  using T = typename Compute<S>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Inputs& in = args.in;
  const Shape& sh = in.shape;
  const int E = static_cast<int>(sh.head_dim), Ev = static_cast<int>(sh.value_dim);
  const int ldk = E + 1;  // padded: lane j reads row j, conflict-free
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kWarps * R][E]
  T* k_s = q_s + kWarps * R * E;            // [kTile][E + 1]
  T* v_s = k_s + kTile * ldk;               // [kTile][Ev]

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int64_t i0 = int64_t(blockIdx.y) * (kWarps * R);
  const int rows = static_cast<int>(min64(kWarps * R, sh.q_len - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const S* query = static_cast<const S*>(in.query) + b * in.q.batch + h * in.q.head;
  const S* key = static_cast<const S*>(in.key) + b * in.k.batch + hk * in.k.head;
  const S* value = static_cast<const S*>(in.value) + b * in.v.batch + hk * in.v.head;

  stage_rows(query + i0 * in.q.row, in.q.row, rows, E, q_s, E);
  T m[R], l[R], o[R][C];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    m[rr] = neg_inf<T>();
    l[rr] = T(0);
#pragma unroll
    for (int t = 0; t < C; ++t) o[rr][t] = T(0);
  }
  const int64_t kv_end = in.causal ? min64(sh.kv_len, i0 + rows) : sh.kv_len;

  for (int64_t j0 = 0; j0 < kv_end; j0 += kTile) {
    const int nk = static_cast<int>(min64(kTile, kv_end - j0));
    __syncthreads();  // the previous tile is consumed
    stage_rows(key + j0 * in.k.row, in.k.row, nk, E, k_s, ldk);
    stage_rows(value + j0 * in.v.row, in.v.row, nk, Ev, v_s, Ev);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int r = warp * R + rr;
      if (r < rows) {  // uniform across the warp
        const int64_t i = i0 + r;
        T s = neg_inf<T>();
        if (lane < nk) s = logit<S, T>(in, dot(q_s + r * E, k_s + lane * ldk, E), b, h, i, j0 + lane);
        const T m_new = max_keep_nan(m[rr], warp_max(s));
        const bool none = m_new == neg_inf<T>();  // no visible key yet: P = 0
        const T p = none ? T(0) : math::exp(s - m_new);
        const T alpha = none ? T(1) : math::exp(m[rr] - m_new);
        l[rr] = l[rr] * alpha + warp_sum(p);
        m[rr] = m_new;
        // Dropout acts after the softmax: the row sum above keeps every P.
        const T p_kept = in.dropout.enabled && lane < nk ? p * dropout_factor<T>(in.dropout, bh, i, j0 + lane) : p;
#pragma unroll
        for (int t = 0; t < C; ++t) o[rr][t] *= alpha;
        for (int jj = 0; jj < nk; ++jj) {
          const T pj = __shfl_sync(kFullMask, p_kept, jj);
#pragma unroll
          for (int t = 0; t < C; ++t) {
            const int c = lane + 32 * t;
            if (c < Ev) o[rr][t] += pj * v_s[jj * Ev + c];
          }
        }
      }
    }
  }

  S* output = static_cast<S*>(args.output) + (bh * sh.q_len + i0) * Ev;
  T* lse = static_cast<T*>(args.logsumexp) + bh * sh.q_len + i0;
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int r = warp * R + rr;
    if (r < rows) {
      // A row that sees no key (fully masked, or Lk == 0) has l == 0 and gives 0, as
      // torch's SDPA does; any visible key adds exp(0) = 1 for the row's maximum.
      const T inv = l[rr] == T(0) ? T(0) : T(1) / l[rr];
#pragma unroll
      for (int t = 0; t < C; ++t) {
        const int c = lane + 32 * t;
        if (c < Ev) output[r * Ev + c] = from_compute<S>(o[rr][t] * inv);
      }
      if (lane == 0) lse[r] = l[rr] == T(0) ? neg_inf<T>() : m[rr] + log(l[rr]);
    }
  }
}

// ---- backward -------------------------------------------------------------------------

// D = rowsum(dO * O), one warp per row.
template <class S>
__global__ void __launch_bounds__(kThreads) row_dot_kernel(BackwardArgs args) {
  using T = typename Compute<S>::type;
  const Shape& sh = args.in.shape;
  const int64_t row = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= sh.batch * sh.heads * sh.q_len) return;
  const int64_t bh = row / sh.q_len, i = row % sh.q_len;
  const int64_t b = bh / sh.heads, h = bh % sh.heads;
  const RowStrides& gs = args.grad_output_strides;
  const S* g = static_cast<const S*>(args.grad_output) + b * gs.batch + h * gs.head + i * gs.row;
  const S* o = static_cast<const S*>(args.output) + row * sh.value_dim;
  T sum = 0;
  for (int64_t c = lane; c < sh.value_dim; c += 32) sum += to_compute(g[c]) * to_compute(o[c]);
  sum = warp_sum(sum);
  if (lane == 0) static_cast<T*>(args.row_dot)[row] = sum;
}

// P = exp(s - lse) (0 for a row that sees no key) and dS = P * (dP - D).
template <class T> __device__ __forceinline__ T probability(T s, T lse) {
  return lse == neg_inf<T>() ? T(0) : math::exp(s - lse);
}

template <class S, int R, int C>
__global__ void __launch_bounds__(kThreads) query_kernel(BackwardArgs args) {
  using T = typename Compute<S>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Inputs& in = args.in;
  const Shape& sh = in.shape;
  const int E = static_cast<int>(sh.head_dim), Ev = static_cast<int>(sh.value_dim);
  const int ldk = E + 1, ldv = Ev + 1;
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [kWarps * R][E]
  T* do_s = q_s + kWarps * R * E;           // [kWarps * R][Ev]
  T* k_s = do_s + kWarps * R * Ev;          // [kTile][E + 1]
  T* v_s = k_s + kTile * ldk;               // [kTile][Ev + 1]

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / sh.heads, h = bh % sh.heads, hk = h / (sh.heads / sh.kv_heads);
  const int64_t i0 = int64_t(blockIdx.y) * (kWarps * R);
  const int rows = static_cast<int>(min64(kWarps * R, sh.q_len - i0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowStrides& gs = args.grad_output_strides;
  const S* key = static_cast<const S*>(in.key) + b * in.k.batch + hk * in.k.head;
  const S* value = static_cast<const S*>(in.value) + b * in.v.batch + hk * in.v.head;
  const T* lse = static_cast<const T*>(args.logsumexp) + bh * sh.q_len + i0;
  const T* dot_rows = static_cast<const T*>(args.row_dot) + bh * sh.q_len + i0;

  stage_rows(static_cast<const S*>(in.query) + b * in.q.batch + h * in.q.head + i0 * in.q.row, in.q.row, rows, E,
             q_s, E);
  stage_rows(static_cast<const S*>(args.grad_output) + b * gs.batch + h * gs.head + i0 * gs.row, gs.row, rows, Ev,
             do_s, Ev);
  T dq[R][C];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
#pragma unroll
    for (int t = 0; t < C; ++t) dq[rr][t] = T(0);
  }
  const int64_t kv_end = in.causal ? min64(sh.kv_len, i0 + rows) : sh.kv_len;

  for (int64_t j0 = 0; j0 < kv_end; j0 += kTile) {
    const int nk = static_cast<int>(min64(kTile, kv_end - j0));
    __syncthreads();
    stage_rows(key + j0 * in.k.row, in.k.row, nk, E, k_s, ldk);
    stage_rows(value + j0 * in.v.row, in.v.row, nk, Ev, v_s, ldv);
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < R; ++rr) {
      const int r = warp * R + rr;
      if (r < rows) {
        T ds = T(0);
        if (lane < nk) {
          const T s = logit<S, T>(in, dot(q_s + r * E, k_s + lane * ldk, E), b, h, i0 + r, j0 + lane);
          const T p = probability(s, lse[r]);
          const T f = dropout_factor<T>(in.dropout, bh, i0 + r, j0 + lane);
          ds = p * (dot(do_s + r * Ev, v_s + lane * ldv, Ev) * f - dot_rows[r]);
        }
        for (int jj = 0; jj < nk; ++jj) {
          const T dsj = __shfl_sync(kFullMask, ds, jj);
#pragma unroll
          for (int t = 0; t < C; ++t) {
            const int c = lane + 32 * t;
            if (c < E) dq[rr][t] += dsj * k_s[jj * ldk + c];
          }
        }
      }
    }
  }

  S* grad_query = static_cast<S*>(args.grad_query) + (bh * sh.q_len + i0) * E;
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int r = warp * R + rr;
    if (r < rows) {
#pragma unroll
      for (int t = 0; t < C; ++t) {
        const int c = lane + 32 * t;
        if (c < E) grad_query[r * E + c] = from_compute<S>(dq[rr][t] * T(in.scale));
      }
    }
  }
}

// dK, dV for a block of kWarps * R keys; sums the query heads of the GQA group and all
// query tiles in order.
template <class S, int R, int C>
__global__ void __launch_bounds__(kThreads) key_value_kernel(BackwardArgs args) {
  using T = typename Compute<S>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Inputs& in = args.in;
  const Shape& sh = in.shape;
  const int E = static_cast<int>(sh.head_dim), Ev = static_cast<int>(sh.value_dim);
  const int ldq = E + 1, ldo = Ev + 1;
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [kWarps * R][E]
  T* v_s = k_s + kWarps * R * E;            // [kWarps * R][Ev]
  T* q_s = v_s + kWarps * R * Ev;           // [kTile][E + 1]
  T* do_s = q_s + kTile * ldq;              // [kTile][Ev + 1]
  T* lse_s = do_s + kTile * ldo;            // [kTile]
  T* dot_s = lse_s + kTile;                 // [kTile]

  const int64_t bhk = blockIdx.x;
  const int64_t b = bhk / sh.kv_heads, hk = bhk % sh.kv_heads;
  const int64_t group = sh.heads / sh.kv_heads;
  const int64_t j0 = int64_t(blockIdx.y) * (kWarps * R);
  const int keys = static_cast<int>(min64(kWarps * R, sh.kv_len - j0));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const RowStrides& gs = args.grad_output_strides;

  stage_rows(static_cast<const S*>(in.key) + b * in.k.batch + hk * in.k.head + j0 * in.k.row, in.k.row, keys, E,
             k_s, E);
  stage_rows(static_cast<const S*>(in.value) + b * in.v.batch + hk * in.v.head + j0 * in.v.row, in.v.row, keys, Ev,
             v_s, Ev);
  T dk[R][C], dv[R][C];
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
#pragma unroll
    for (int t = 0; t < C; ++t) dk[rr][t] = dv[rr][t] = T(0);
  }
  // Causal: query i sees key j iff j <= i, so queries before j0 see none of this block.
  const int64_t first_query = in.causal ? j0 : 0;

  for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
    const int64_t bh = b * sh.heads + h;
    const S* query = static_cast<const S*>(in.query) + b * in.q.batch + h * in.q.head;
    const S* grad_out = static_cast<const S*>(args.grad_output) + b * gs.batch + h * gs.head;
    for (int64_t i0 = first_query; i0 < sh.q_len; i0 += kTile) {
      const int nq = static_cast<int>(min64(kTile, sh.q_len - i0));
      __syncthreads();
      stage_rows(query + i0 * in.q.row, in.q.row, nq, E, q_s, ldq);
      stage_rows(grad_out + i0 * gs.row, gs.row, nq, Ev, do_s, ldo);
      if (threadIdx.x < nq) {
        lse_s[threadIdx.x] = static_cast<const T*>(args.logsumexp)[bh * sh.q_len + i0 + threadIdx.x];
        dot_s[threadIdx.x] = static_cast<const T*>(args.row_dot)[bh * sh.q_len + i0 + threadIdx.x];
      }
      __syncthreads();
#pragma unroll
      for (int rr = 0; rr < R; ++rr) {
        const int r = warp * R + rr;
        if (r < keys) {
          T p = T(0), ds = T(0);
          if (lane < nq) {  // lane = query i0 + lane against key j0 + r
            const T s = logit<S, T>(in, dot(k_s + r * E, q_s + lane * ldq, E), b, h, i0 + lane, j0 + r);
            p = probability(s, lse_s[lane]);
            const T f = dropout_factor<T>(in.dropout, bh, i0 + lane, j0 + r);
            ds = p * (dot(v_s + r * Ev, do_s + lane * ldo, Ev) * f - dot_s[lane]);
            p *= f;  // dV sums the dropped P
          }
          for (int ii = 0; ii < nq; ++ii) {
            const T pi = __shfl_sync(kFullMask, p, ii);
            const T dsi = __shfl_sync(kFullMask, ds, ii);
#pragma unroll
            for (int t = 0; t < C; ++t) {
              const int c = lane + 32 * t;
              if (c < Ev) dv[rr][t] += pi * do_s[ii * ldo + c];
              if (c < E) dk[rr][t] += dsi * q_s[ii * ldq + c];
            }
          }
        }
      }
    }
  }

  S* grad_key = static_cast<S*>(args.grad_key) + (bhk * sh.kv_len + j0) * E;
  S* grad_value = static_cast<S*>(args.grad_value) + (bhk * sh.kv_len + j0) * Ev;
#pragma unroll
  for (int rr = 0; rr < R; ++rr) {
    const int r = warp * R + rr;
    if (r < keys) {
#pragma unroll
      for (int t = 0; t < C; ++t) {
        const int c = lane + 32 * t;
        if (c < E) grad_key[r * E + c] = from_compute<S>(dk[rr][t] * T(in.scale));
        if (c < Ev) grad_value[r * Ev + c] = from_compute<S>(dv[rr][t]);
      }
    }
  }
}

// ---- launch ---------------------------------------------------------------------------

// Calls fn.template operator()<S, R, C>() for the storage type, rows per warp (4, or 2
// for double to bound shared memory) and column chunks covering max(E, Ev).
template <class Fn>
void dispatch(DType dtype, int64_t max_dim, Fn&& fn) {
  auto with_chunks = [&]<class S, int R>() {
    if (max_dim <= 32) fn.template operator()<S, R, 1>();
    else if (max_dim <= 64) fn.template operator()<S, R, 2>();
    else if (max_dim <= 128) fn.template operator()<S, R, 4>();
    else fn.template operator()<S, R, 8>();
  };
  switch (dtype) {
    case DType::kFloat32: with_chunks.template operator()<float, 4>(); break;
    case DType::kFloat64: with_chunks.template operator()<double, 2>(); break;
    case DType::kFloat16: with_chunks.template operator()<__half, 4>(); break;
    case DType::kBFloat16: with_chunks.template operator()<__nv_bfloat16, 4>(); break;
  }
}

// Opts a kernel into `bytes` of dynamic shared memory (beyond the default 48 KiB).
template <class Kernel> cudaError_t allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace

int launch_forward_cuda(const ForwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Shape& sh = args.in.shape;
  if (sh.batch * sh.heads == 0 || sh.q_len == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch(args.in.dtype, std::max(sh.head_dim, sh.value_dim), [&]<class S, int R, int C>() {
    using T = typename Compute<S>::type;
    const int64_t block_rows = kWarps * R;
    const size_t smem = sizeof(T) * (block_rows * sh.head_dim + kTile * (sh.head_dim + 1) + kTile * sh.value_dim);
    status = allow_shared_memory(forward_kernel<S, R, C>, smem);
    if (status != cudaSuccess) return;
    const dim3 grid(static_cast<unsigned>(sh.batch * sh.heads), static_cast<unsigned>(ceil_div(sh.q_len, block_rows)));
    forward_kernel<S, R, C><<<grid, kThreads, smem, stream>>>(args);
    status = cudaGetLastError();
  });
  return status;
}

int launch_backward_cuda(const BackwardArgs& args, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  const Shape& sh = args.in.shape;
  if (sh.batch * sh.heads == 0 || sh.q_len == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  dispatch(args.in.dtype, std::max(sh.head_dim, sh.value_dim), [&]<class S, int R, int C>() {
    using T = typename Compute<S>::type;
    const int64_t rows = sh.batch * sh.heads * sh.q_len;
    row_dot_kernel<S><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(args);
    if ((status = cudaGetLastError()) != cudaSuccess) return;

    const int64_t block_rows = kWarps * R;
    const int64_t E = sh.head_dim, Ev = sh.value_dim;
    if (sh.kv_len > 0) {
      const size_t smem_kv = sizeof(T) * (block_rows * (E + Ev) + kTile * (E + 1) + kTile * (Ev + 1) + 2 * kTile);
      if ((status = allow_shared_memory(key_value_kernel<S, R, C>, smem_kv)) != cudaSuccess) return;
      const dim3 grid_kv(static_cast<unsigned>(sh.batch * sh.kv_heads),
                         static_cast<unsigned>(ceil_div(sh.kv_len, block_rows)));
      key_value_kernel<S, R, C><<<grid_kv, kThreads, smem_kv, stream>>>(args);
      if ((status = cudaGetLastError()) != cudaSuccess) return;
    }

    const size_t smem_q = sizeof(T) * (block_rows * (E + Ev) + kTile * (E + 1) + kTile * (Ev + 1));
    if ((status = allow_shared_memory(query_kernel<S, R, C>, smem_q)) != cudaSuccess) return;
    const dim3 grid_q(static_cast<unsigned>(sh.batch * sh.heads),
                      static_cast<unsigned>(ceil_div(sh.q_len, block_rows)));
    query_kernel<S, R, C><<<grid_q, kThreads, smem_q, stream>>>(args);
    status = cudaGetLastError();
  });
  return status;
}

}  // namespace fastlayers::attention

// Torch-free interface between the flash-attention ops (attention.cpp) and their CPU
// kernels (attention_cpu_kernel.cpp, compiled per CPU ISA).
//
// Layout: query (B, H, Lq, E), key (B, Hkv, Lk, E), value (B, Hkv, Lk, Ev), with H a
// multiple of Hkv (query head h reads key/value head h / (H / Hkv)). Inputs are
// addressed through element strides of their batch, head and row dimensions; each row
// (the last dimension) is contiguous. The optional additive mask has the query's
// storage type and is addressed through four strides (batch, head, query row, key
// column), 0 along broadcast dimensions. Outputs are dense (contiguous).
#pragma once

#include <cstdint>

#include "attention/dropout.h"
#include "common/cpu_isa.h"
#include "common/dtype.h"

namespace fastlayers::attention {

struct Shape {
  int64_t batch = 0;
  int64_t heads = 0;     // H, query heads
  int64_t kv_heads = 0;  // Hkv, divides H
  int64_t q_len = 0;     // Lq
  int64_t kv_len = 0;    // Lk
  int64_t head_dim = 0;  // E (query and key)
  int64_t value_dim = 0; // Ev
};

// Element strides of a (batch, head, row, contiguous column) tensor.
struct RowStrides {
  int64_t batch = 0;
  int64_t head = 0;
  int64_t row = 0;
};

struct Inputs {
  const void* query = nullptr;
  const void* key = nullptr;
  const void* value = nullptr;
  RowStrides q, k, v;
  const void* mask = nullptr;  // additive, storage dtype of query; null when none
  int64_t mask_strides[4] = {0, 0, 0, 0};
  Shape shape;
  bool causal = false;  // key j is visible to query i iff j <= i (top-left aligned)
  double scale = 1.0;
  DType dtype = DType::kFloat32;
  // Dropout on the probabilities (dropout.h): the forward drops P before P V, the
  // backward regenerates the same mask from the same parameters.
  DropoutParams dropout;
};

struct ForwardArgs {
  Inputs in;
  void* output = nullptr;     // (B, H, Lq, Ev), storage dtype
  void* logsumexp = nullptr;  // (B, H, Lq), double for float64 else float; -inf where a row sees no key
};

struct BackwardArgs {
  Inputs in;
  const void* grad_output = nullptr;  // dO, rows contiguous, strides in grad_output_strides
  RowStrides grad_output_strides;
  const void* output = nullptr;       // O of the forward, dense (B, H, Lq, Ev)
  const void* logsumexp = nullptr;    // (B, H, Lq) as the forward wrote it
  void* row_dot = nullptr;            // (B, H, Lq) workspace: D_i = sum_c dO_ic O_ic, lse's type
  void* grad_query = nullptr;         // dense (B, H, Lq, E), storage dtype
  void* grad_key = nullptr;           // dense (B, Hkv, Lk, E)
  void* grad_value = nullptr;         // dense (B, Hkv, Lk, Ev)
  // CPU, fused backward only: a zeroed (B * H, round_up(Lq, kBlockQ), ld) buffer of the
  // compute type with ld = grad_query_accumulator_ld >= round_up(E, 32); null for the
  // split passes.
  void* grad_query_accumulator = nullptr;
  int64_t grad_query_accumulator_ld = 0;
};

// Tile sizes: a unit of forward / dQ work is one (batch, head, block of kBlockQ query
// rows); a unit of dK/dV work is one (batch, kv head, block of kBlockK key rows).
constexpr int64_t kBlockQ = 64;
constexpr int64_t kBlockK = 64;
// The CPU forward walks the keys of a query block in tiles of kForwardBlockK: per tile
// the max pass, the rescale of O and the P V product's load and store of O are spread
// over twice the keys of kBlockK. B1 H8 L2048 E64: 20.9-21.2 ms against 21.6-21.9 with
// 64-key tiles (256 ran as 128).
constexpr int64_t kForwardBlockK = 128;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t forward_units(const Shape& s) { return s.batch * s.heads * ceil_div(s.q_len, kBlockQ); }
inline int64_t row_dot_units(const Shape& s) { return s.batch * s.heads; }
inline int64_t key_value_units(const Shape& s) { return s.batch * s.kv_heads * ceil_div(s.kv_len, kBlockK); }
inline int64_t fused_backward_units(const Shape& s) { return s.batch * s.kv_heads; }

struct CpuKernels {
  void (*forward)(const ForwardArgs& args, int64_t unit_begin, int64_t unit_end);
  // D = rowsum(dO * O) for units of (batch, head).
  void (*backward_row_dot)(const BackwardArgs& args, int64_t unit_begin, int64_t unit_end);
  // dK, dV for key blocks (key_value_units); each sums over the query heads of its group
  // and every query block in a fixed order (deterministic, no atomics). With
  // args.grad_query_accumulator set, units are (batch, kv head) (fused_backward_units)
  // and the pass also produces dQ, making backward_query unnecessary: the same bits with
  // 5 tile products instead of 7, for shapes with enough heads to keep threads busy.
  void (*backward_key_value)(const BackwardArgs& args, int64_t unit_begin, int64_t unit_end);
  // dQ for query blocks (forward_units).
  void (*backward_query)(const BackwardArgs& args, int64_t unit_begin, int64_t unit_end);
};

#if defined(FASTLAYERS_WITH_CUDA) || defined(__CUDACC__)
// The CUDA kernels (attention_cuda_kernel.cu) take head and value dims up to this.
constexpr int64_t kCudaMaxHeadDim = 256;
// Each returns a cudaError_t as int (0 = success); `stream` is a cudaStream_t. The
// backward writes args.row_dot first, then dK/dV and dQ.
int launch_forward_cuda(const ForwardArgs& args, void* stream);
int launch_backward_cuda(const BackwardArgs& args, void* stream);
#endif

}  // namespace fastlayers::attention

FL_DECLARE_CPU_KERNEL_TABLE(fastlayers::attention::CpuKernels, attention_cpu_kernels)

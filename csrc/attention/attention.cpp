// fastlayers::flash_attention and fastlayers::flash_attention_backward: argument checks
// and the CPU implementation (kernels in attention_cpu_kernel.cpp).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

#include "attention/attention.h"
#include "common/torch_utils.h"

namespace fastlayers::attention {

void check_same(const at::Tensor& t, const at::Tensor& query, const char* op, const char* name) {
  TORCH_CHECK(t.device() == query.device(), op, ": ", name, " is on ", t.device(), " but query is on ",
              query.device());
  TORCH_CHECK_TYPE(t.scalar_type() == query.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " does not match query dtype ", query.scalar_type());
}

Shape check_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                   const std::optional<at::Tensor>& attn_mask, const char* op) {
  kernel_dtype(query, op, "query");
  TORCH_CHECK(query.dim() == 4, op, ": query must be 4-D (batch, heads, query length, head dim), got shape ",
              query.sizes());
  TORCH_CHECK(key.dim() == 4, op, ": key must be 4-D (batch, kv heads, key length, head dim), got shape ",
              key.sizes());
  TORCH_CHECK(value.dim() == 4, op, ": value must be 4-D (batch, kv heads, key length, value dim), got shape ",
              value.sizes());
  check_same(key, query, op, "key");
  check_same(value, query, op, "value");
  Shape s;
  s.batch = query.size(0);
  s.heads = query.size(1);
  s.q_len = query.size(2);
  s.head_dim = query.size(3);
  s.kv_heads = key.size(1);
  s.kv_len = key.size(2);
  s.value_dim = value.size(3);
  TORCH_CHECK(key.size(0) == s.batch && value.size(0) == s.batch, op,
              ": query, key and value must have the same batch size, got ", query.sizes(), ", ", key.sizes(), ", ",
              value.sizes());
  TORCH_CHECK(key.size(3) == s.head_dim, op, ": key head dim ", key.size(3), " does not match query head dim ",
              s.head_dim);
  TORCH_CHECK(value.size(1) == s.kv_heads && value.size(2) == s.kv_len, op,
              ": value must have key's heads and length (", s.kv_heads, ", ", s.kv_len, "), got shape ",
              value.sizes());
  TORCH_CHECK(s.kv_heads > 0 ? s.heads % s.kv_heads == 0 : s.heads == 0, op, ": query heads (", s.heads,
              ") must be a multiple of key/value heads (", s.kv_heads, ")");
  if (attn_mask.has_value()) {
    const at::Tensor& m = *attn_mask;
    TORCH_CHECK(m.device() == query.device(), op, ": attn_mask is on ", m.device(), " but query is on ",
                query.device());
    TORCH_CHECK_TYPE(m.scalar_type() == at::kBool || m.scalar_type() == query.scalar_type(), op,
                     ": attn_mask must be bool or have query's dtype ", query.scalar_type(), ", got ",
                     m.scalar_type());
    const std::vector<int64_t> full = {s.batch, s.heads, s.q_len, s.kv_len};
    bool broadcastable = m.dim() <= 4;
    for (int64_t d = 0; broadcastable && d < m.dim(); ++d) {
      const int64_t size = m.size(m.dim() - 1 - d);
      broadcastable = size == 1 || size == full[3 - d];
    }
    TORCH_CHECK(broadcastable, op, ": attn_mask of shape ", m.sizes(),
                " does not broadcast to (batch, heads, query length, key length) = ", at::IntArrayRef(full));
  }
  return s;
}

at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous();
}

RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

at::Tensor additive_mask(const at::Tensor& mask, const at::Tensor& query, const Shape& s) {
  at::Tensor m = mask;
  if (m.scalar_type() == at::kBool) {
    m = at::where(m, at::zeros({}, query.options()),
                  at::full({}, -std::numeric_limits<double>::infinity(), query.options()));
  }
  return m.expand({s.batch, s.heads, s.q_len, s.kv_len});
}

Inputs make_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask,
                   const Shape& s, bool is_causal, double scale, const char* op) {
  Inputs in;
  in.query = q.const_data_ptr();
  in.key = k.const_data_ptr();
  in.value = v.const_data_ptr();
  in.q = row_strides(q);
  in.k = row_strides(k);
  in.v = row_strides(v);
  if (mask.defined()) {
    in.mask = mask.const_data_ptr();
    for (int d = 0; d < 4; ++d) in.mask_strides[d] = mask.stride(d);
  }
  in.shape = s;
  in.causal = is_causal;
  in.scale = scale;
  in.dtype = kernel_dtype(q, op, "query");
  return in;
}

DropoutParams dropout_params(double dropout_p, const std::optional<at::Tensor>& dropout_seed, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
  DropoutParams d;
  if (dropout_p == 0.0) return d;
  TORCH_CHECK(dropout_seed.has_value(), op, ": dropout_p = ", dropout_p,
              " needs dropout_seed, an int64 tensor [seed, offset]");
  const at::Tensor& t = *dropout_seed;
  TORCH_CHECK(t.device().is_cpu(), op, ": dropout_seed must be on the CPU, got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, op, ": dropout_seed must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == 2, op, ": dropout_seed must have shape [2] (seed, offset), got shape ",
              t.sizes());
  const at::Tensor words = t.contiguous();
  const int64_t* v = words.const_data_ptr<int64_t>();
  d.seed = static_cast<uint64_t>(v[0]);
  d.offset = static_cast<uint32_t>(static_cast<uint64_t>(v[1]));
  // Keep a word w (uniform on [0, 2^32)) iff w >= round(p * 2^32): probability 1 - p.
  d.threshold = static_cast<uint64_t>(std::llround(dropout_p * 4294967296.0));
  d.keep_scale = dropout_p < 1.0 ? 1.0 / (1.0 - dropout_p) : 0.0;
  d.enabled = true;
  return d;
}

at::ScalarType lse_dtype(const at::Tensor& query) {
  return query.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

Shape check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
                            const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
                            const std::optional<at::Tensor>& attn_mask, const char* op) {
  const Shape s = check_inputs(query, key, value, attn_mask, op);
  const std::vector<int64_t> out_shape = {s.batch, s.heads, s.q_len, s.value_dim};
  TORCH_CHECK(grad_output.sizes() == at::IntArrayRef(out_shape), op, ": grad_output must have shape ",
              at::IntArrayRef(out_shape), ", got ", grad_output.sizes());
  TORCH_CHECK(output.sizes() == at::IntArrayRef(out_shape), op, ": output must have shape ",
              at::IntArrayRef(out_shape), ", got ", output.sizes());
  check_same(grad_output, query, op, "grad_output");
  check_same(output, query, op, "output");
  TORCH_CHECK(logsumexp.sizes() == at::IntArrayRef({s.batch, s.heads, s.q_len}), op,
              ": logsumexp must have shape (batch, heads, query length) = ",
              at::IntArrayRef({s.batch, s.heads, s.q_len}), ", got ", logsumexp.sizes());
  TORCH_CHECK_TYPE(logsumexp.scalar_type() == lse_dtype(query), op, ": logsumexp must be ",
                   lse_dtype(query), " for ", query.scalar_type(), " inputs, got ", logsumexp.scalar_type());
  TORCH_CHECK(logsumexp.device() == query.device(), op, ": logsumexp is on ", logsumexp.device(),
              " but query is on ", query.device());

  return s;
}

namespace {

// The checked shape, the device's own check, then query/key/value and the mask as the
// kernels read them.
void lay_out_inputs(CallInputs& c, const Shape& shape, const at::Tensor& query, const at::Tensor& key,
                    const at::Tensor& value, const std::optional<at::Tensor>& attn_mask, DeviceCheck check_device,
                    const char* op) {
  c.shape = shape;
  if (check_device) check_device(shape, op);
  c.q = rows_contiguous(query);
  c.k = rows_contiguous(key);
  c.v = rows_contiguous(value);
  if (attn_mask.has_value()) c.mask = additive_mask(*attn_mask, c.q, shape);
}

}  // namespace

ForwardCall prepare_forward(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                            double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                            DeviceCheck check_device) {
  const char* op = "flash_attention";
  ForwardCall c;
  const Shape shape = check_inputs(query, key, value, attn_mask, op);
  const DropoutParams dropout = dropout_params(dropout_p, dropout_seed, op);
  lay_out_inputs(c, shape, query, key, value, attn_mask, check_device, op);
  const Shape& s = c.shape;
  c.output = at::empty({s.batch, s.heads, s.q_len, s.value_dim}, c.q.options());
  c.logsumexp = at::empty({s.batch, s.heads, s.q_len}, c.q.options().dtype(lse_dtype(c.q)));
  c.args.in = make_inputs(c.q, c.k, c.v, c.mask, s, is_causal, scale, op);
  c.args.in.dropout = dropout;
  c.args.output = c.output.mutable_data_ptr();
  c.args.logsumexp = c.logsumexp.mutable_data_ptr();
  return c;
}

BackwardCall prepare_backward(const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key,
                              const at::Tensor& value, const at::Tensor& output, const at::Tensor& logsumexp,
                              const std::optional<at::Tensor>& attn_mask, bool is_causal, double scale,
                              double dropout_p, const std::optional<at::Tensor>& dropout_seed,
                              DeviceCheck check_device) {
  const char* op = "flash_attention_backward";
  BackwardCall c;
  const Shape shape = check_backward_inputs(grad_output, query, key, value, output, logsumexp, attn_mask, op);
  const DropoutParams dropout = dropout_params(dropout_p, dropout_seed, op);
  lay_out_inputs(c, shape, query, key, value, attn_mask, check_device, op);
  const Shape& s = c.shape;
  c.grad_output = rows_contiguous(grad_output);
  c.output = output.contiguous();
  c.logsumexp = logsumexp.contiguous();
  c.grad_query = at::empty({s.batch, s.heads, s.q_len, s.head_dim}, c.q.options());
  c.grad_key = at::empty({s.batch, s.kv_heads, s.kv_len, s.head_dim}, c.q.options());
  c.grad_value = at::empty({s.batch, s.kv_heads, s.kv_len, s.value_dim}, c.q.options());
  c.row_dot = at::empty({s.batch, s.heads, s.q_len}, c.logsumexp.options());
  BackwardArgs& args = c.args;
  args.in = make_inputs(c.q, c.k, c.v, c.mask, s, is_causal, scale, op);
  args.in.dropout = dropout;
  args.grad_output = c.grad_output.const_data_ptr();
  args.grad_output_strides = row_strides(c.grad_output);
  args.output = c.output.const_data_ptr();
  args.logsumexp = c.logsumexp.const_data_ptr();
  args.row_dot = c.row_dot.mutable_data_ptr();
  args.grad_query = c.grad_query.mutable_data_ptr();
  args.grad_key = c.grad_key.mutable_data_ptr();
  args.grad_value = c.grad_value.mutable_data_ptr();
  return c;
}

namespace {

std::tuple<at::Tensor, at::Tensor> flash_attention_cpu(const at::Tensor& query, const at::Tensor& key,
                                                       const at::Tensor& value,
                                                       const std::optional<at::Tensor>& attn_mask, bool is_causal,
                                                       double scale, double dropout_p,
                                                       const std::optional<at::Tensor>& dropout_seed) {
  ForwardCall c = prepare_forward(query, key, value, attn_mask, is_causal, scale, dropout_p, dropout_seed);
  if (c.output.numel() == 0 && c.logsumexp.numel() == 0) return {c.output, c.logsumexp};
  const CpuKernels& kernels = attention_cpu_kernels_select();
  at::parallel_for(0, forward_units(c.shape), 1, [&](int64_t b, int64_t e) { kernels.forward(c.args, b, e); });
  return {c.output, c.logsumexp};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attention_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
    const at::Tensor& output, const at::Tensor& logsumexp, const std::optional<at::Tensor>& attn_mask,
    bool is_causal, double scale, double dropout_p, const std::optional<at::Tensor>& dropout_seed) {
  BackwardCall c = prepare_backward(grad_output, query, key, value, output, logsumexp, attn_mask, is_causal, scale,
                                    dropout_p, dropout_seed);
  const Shape& s = c.shape;
  if (s.q_len == 0 || s.batch == 0 || s.heads == 0) {  // no query sees anything: all gradients are 0
    c.grad_key.zero_();
    c.grad_value.zero_();
    return {c.grad_query, c.grad_key, c.grad_value};
  }
  BackwardArgs& args = c.args;
  const CpuKernels& kernels = attention_cpu_kernels_select();
  at::parallel_for(0, row_dot_units(s), 1, [&](int64_t b, int64_t e) { kernels.backward_row_dot(args, b, e); });
  // Enough (batch, kv head) pairs for every thread: one fused pass (dK, dV and dQ, five
  // tile products); else dK/dV per key block and dQ per query block (seven, more
  // parallel). Both give the same bits, so the thread count never changes the result.
  if (fused_backward_units(s) >= at::get_num_threads()) {
    const int64_t ld = (s.head_dim + 31) / 32 * 32;
    at::Tensor accumulator =
        at::zeros({s.batch * s.heads, ceil_div(s.q_len, kBlockQ) * kBlockQ, ld}, c.logsumexp.options());
    args.grad_query_accumulator = accumulator.mutable_data_ptr();
    args.grad_query_accumulator_ld = ld;
    at::parallel_for(0, fused_backward_units(s), 1,
                     [&](int64_t b, int64_t e) { kernels.backward_key_value(args, b, e); });
  } else {
    at::parallel_for(0, key_value_units(s), 1,
                     [&](int64_t b, int64_t e) { kernels.backward_key_value(args, b, e); });
    at::parallel_for(0, forward_units(s), 1, [&](int64_t b, int64_t e) { kernels.backward_query(args, b, e); });
  }
  return {c.grad_query, c.grad_key, c.grad_value};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("flash_attention", &flash_attention_cpu);
  m.impl("flash_attention_backward", &flash_attention_backward_cpu);
}

}  // namespace fastlayers::attention

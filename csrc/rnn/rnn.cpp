// fastlayers LSTM and Elman RNN ops: checks, the step loops (GEMMs and fused pointwise
// kernels through the device's launchers) and the CPU registrations.
//
// GEMMs: per layer one input projection of all timesteps (biases included), per step
// one recurrent GEMM (and the projection's), after the backward loop the input and
// weight gradients over all timesteps; everything between two GEMMs is one fused
// pointwise pass. On the CPU, float32 and float64 GEMMs run the packed micro-kernel of
// rnn_cpu_kernel.cpp (why: see there), other dtypes ATen's; CUDA uses cuBLAS via ATen.
#include "rnn/rnn.h"

#include <algorithm>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/torch_utils.h"

namespace fastlayers::rnn {

Cell parse_nonlinearity(std::string_view nonlinearity, const char* op) {
  if (nonlinearity == "tanh") return Cell::kRnnTanh;
  if (nonlinearity == "relu") return Cell::kRnnRelu;
  TORCH_CHECK_VALUE(false, op, ": unknown nonlinearity '", std::string(nonlinearity),
                    "'; expected 'tanh' or 'relu'");
  return Cell::kRnnTanh;
}

namespace {

class AtenStepMatmul final : public StepMatmul {
 public:
  explicit AtenStepMatmul(at::Tensor b) : b_(std::move(b)) {}
  void run(const void* a, int64_t lda, int64_t m, void* c, int64_t ldc, bool accumulate) override {
    const int64_t k = b_.size(0), n = b_.size(1);
    const at::Tensor a_view = at::from_blob(const_cast<void*>(a), {m, k}, {lda, 1}, b_.options());
    aten_matmul_out(at::from_blob(c, {m, n}, {ldc, 1}, b_.options()), a_view, b_, accumulate);
  }

 private:
  at::Tensor b_;
};

}  // namespace

std::unique_ptr<StepMatmul> make_aten_step_matmul(const at::Tensor& b) { return std::make_unique<AtenStepMatmul>(b); }

void aten_matmul_out(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (accumulate) {
    c.addmm_(a, b);
  } else {
    at::mm_out(c, a, b);
  }
}

void aten_matmul_bias_out(at::Tensor c, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  at::addmm_out(c, bias, a, b);
}

namespace {

bool is_lstm(Cell cell) { return cell == Cell::kLstm; }

void check_like_input(const char* op, const char* name, const at::Tensor& t, const at::Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": ", name, " is on ", t.device(), " but input is on ",
              input.device());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type(), op, ": ", name, " dtype ", t.scalar_type(),
                   " does not match input dtype ", input.scalar_type());
}

// The checks of torch's RNN cells (same messages for the shape errors torch reports),
// plus the weight and bias shapes. `input` is [batch, input_size], for the layers
// [seq_len, batch, input_size] or packed [rows, input_size]; `batch` is its batch size;
// hidden0 / hidden1 are hx / cx as torch names them. With a projection w_hr [P, H]
// (LSTM only), w_hh is [4H, P] and hx [B, P].
void check_forward_args(const char* op, Cell cell, const at::Tensor& input, int64_t batch, const at::Tensor& hx,
                        const at::Tensor* cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
                        const at::Tensor* w_hr = nullptr) {
  kernel_dtype(input, op, "input");
  const int64_t gates = gate_count(cell);
  const int64_t input_size = input.size(input.dim() - 1);
  int64_t hidden = 0, output_size = 0;
  if (w_hr != nullptr) {
    TORCH_CHECK(w_hr->dim() == 2, op, ": w_hr must be 2-D [proj_size, hidden_size], got ", w_hr->sizes());
    hidden = w_hr->size(1);
    output_size = w_hr->size(0);
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * hidden && w_hh.size(1) == output_size, op,
                ": with w_hr of shape ", w_hr->sizes(), ", w_hh must have shape [", gates * hidden, ", ", output_size,
                "], got ", w_hh.sizes());
    check_like_input(op, "w_hr", *w_hr, input);
  } else {
    TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == gates * w_hh.size(1), op, ": w_hh must have shape [", gates,
                " * hidden_size, hidden_size], got ", w_hh.sizes());
    hidden = output_size = w_hh.size(1);
  }
  TORCH_CHECK(w_ih.dim() == 2 && w_ih.size(0) == gates * hidden, op, ": w_ih must have shape [", gates * hidden,
              ", input_size] (", gates, " * hidden_size rows, as w_hh), got ", w_ih.sizes());
  TORCH_CHECK(input_size == w_ih.size(1), "input has inconsistent input_size: got ", input_size, " expected ",
              w_ih.size(1));
  auto check_state = [&](const at::Tensor& state, const char* name, int64_t size) {
    TORCH_CHECK(state.dim() == 2, op, ": ", name, " must be 2-D [batch, hidden_size], got shape ", state.sizes());
    TORCH_CHECK(state.size(0) == batch, "Input batch size ", batch, " doesn't match ", name, " batch size ",
                state.size(0));
    TORCH_CHECK(state.size(1) == size, name, " has inconsistent hidden_size: got ", state.size(1), ", expected ",
                size);
    check_like_input(op, name, state, input);
  };
  check_state(hx, "hidden0", output_size);
  if (cx != nullptr) check_state(*cx, "hidden1", hidden);
  check_like_input(op, "w_ih", w_ih, input);
  check_like_input(op, "w_hh", w_hh, input);
  for (const auto& [bias, name] : {std::pair{&b_ih, "b_ih"}, std::pair{&b_hh, "b_hh"}}) {
    if (!bias->has_value()) continue;
    const at::Tensor& b = **bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == gates * hidden, op, ": ", name, " must have shape [", gates * hidden,
                "], got ", b.sizes());
    check_like_input(op, name, b, input);
  }
}

void check_cell_input(const char* op, const at::Tensor& input) {
  TORCH_CHECK(input.dim() == 2, op, ": input must be 2-D [batch, input_size], got shape ", input.sizes());
}

void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                 const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ", t.sizes());
  check_like_input(op, name, t, like);
}

// b_ih + b_hh, b_ih or b_hh (undefined when there is none): added by the input
// projection GEMM once for all timesteps, so the per-step kernels carry no bias.
at::Tensor combined_bias(const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh) {
  if (b_ih.has_value() && b_hh.has_value()) return at::add(*b_ih, *b_hh);
  if (b_ih.has_value()) return *b_ih;
  if (b_hh.has_value()) return *b_hh;
  return at::Tensor();
}

// The time steps of one layer call and where their rows lie: step t holds batch rows
// [0, sizes[t]) at rows offsets[t] + row of the dense [rows, width] buffers (input,
// output, cells, gates and their gradients). Time-major input [T, B, I]: B rows every
// step. Packed input (a PackedSequence's data and batch_sizes; its sequences sorted by
// decreasing length, so step t holds the sequences longer than t, a prefix of the
// batch): only the rows that exist, no padded work. `reverse` runs the steps from
// T - 1 down to 0; a packed sequence then starts from its initial state at its own
// last step, where it joins the batch.
struct StepLayout {
  int64_t steps = 0, batch = 0, rows = 0;
  bool packed = false, reverse = false;
  std::vector<int64_t> sizes, offsets;

  // The step whose states step t continues, or -1: the initial states hx, cx.
  int64_t previous(int64_t t) const {
    const int64_t p = reverse ? t + 1 : t - 1;
    return p >= 0 && p < steps ? p : -1;
  }
  // The i-th step the forward pass runs (forward_order) or the backward pass.
  int64_t nth(int64_t i, bool forward_order) const { return forward_order != reverse ? i : steps - 1 - i; }
  std::vector<int64_t> shape(int64_t width) const {
    return packed ? std::vector<int64_t>{rows, width} : std::vector<int64_t>{steps, batch, width};
  }
  // Batch rows [row_begin, row_end) of step t as at most two runs, run(r0, r1,
  // from_initial): the rows continuing step previous(t), then those that start from
  // hx / cx there (all at the first step; reverse packed: the sequences ending at t).
  template <typename Run>
  void for_each_run(int64_t t, int64_t row_begin, int64_t row_end, const Run& run) const {
    const int64_t active = std::min(row_end, sizes[t]);
    const int64_t p = previous(t);
    const int64_t carried = std::clamp(p < 0 ? int64_t{0} : sizes[p], row_begin, std::max(row_begin, active));
    if (carried > row_begin) run(row_begin, carried, false);
    if (active > carried) run(carried, active, true);
  }
};

// Checks the layer input (time-major [T, B, I], or packed [rows, I] with batch_sizes)
// and lays out its steps.
StepLayout make_layout(const char* op, const at::Tensor& input, const std::optional<at::Tensor>& batch_sizes,
                       bool reverse) {
  StepLayout layout;
  layout.reverse = reverse;
  if (batch_sizes.has_value()) {
    const at::Tensor& sizes = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, op, ": with batch_sizes, input must be 2-D packed data [rows, input_size], got shape ",
                input.sizes());
    TORCH_CHECK(sizes.device().is_cpu() && sizes.scalar_type() == at::kLong && sizes.dim() == 1 && sizes.numel() >= 1,
                op, ": batch_sizes must be a non-empty 1-D int64 CPU tensor (a PackedSequence's), got ",
                sizes.scalar_type(), " of shape ", sizes.sizes(), " on ", sizes.device());
    const at::Tensor values = sizes.contiguous();
    const int64_t* data = values.const_data_ptr<int64_t>();
    layout.packed = true;
    layout.steps = values.numel();
    layout.sizes.assign(data, data + layout.steps);
  } else {
    TORCH_CHECK(input.dim() == 3, op, ": input must be 3-D [seq_len, batch, input_size], got shape ", input.sizes());
    TORCH_CHECK(input.size(0) >= 1, op, ": input must have at least one time step, got shape ", input.sizes());
    layout.steps = input.size(0);
    layout.sizes.assign(layout.steps, input.size(1));
  }
  layout.offsets.assign(layout.steps + 1, 0);
  for (int64_t t = 0; t < layout.steps; ++t) {
    const int64_t size = layout.sizes[t];
    TORCH_CHECK(!layout.packed || (size >= 1 && (t == 0 || size <= layout.sizes[t - 1])), op,
                ": batch_sizes must be positive and non-increasing (sequences sorted by decreasing length), got ",
                *batch_sizes);
    layout.offsets[t + 1] = layout.offsets[t] + size;
  }
  layout.batch = layout.sizes[0];
  layout.rows = layout.offsets[layout.steps];
  TORCH_CHECK(!layout.packed || layout.rows == input.size(0), op, ": batch_sizes sum to ", layout.rows,
              " but the packed input has ", input.size(0), " rows");
  return layout;
}

// The single-step cells: a layer of one time-major step.
StepLayout cell_layout(const at::Tensor& input) { return make_layout("cell", input.unsqueeze(0), std::nullopt, false); }

// Runs a step loop run_rows(row_begin, row_end) over the batch rows. On the CPU the
// batch is split between the threads once for the whole sequence: every step of a
// row only reads that row's state, and one parallel region per layer replaces the
// two fork/joins per step (GEMM, pointwise) that cost more than the small per-step
// work itself (LSTM train at B=100, H=50 did not scale from 1 to 2 threads). The GEMM
// and pointwise launches inside then run inline on their thread (ATen does not nest
// parallel regions). The parts carry equal numbers of row steps: packed sequences
// shorten down the batch. CUDA runs all rows in one go: its kernels are asynchronous.
// row_cost: the per-step multiply-adds of one row (gate_width x recurrent depth).
template <typename RunRows>
void run_rows_split(const at::Tensor& x, const StepLayout& layout, int64_t row_cost, const RunRows& run_rows) {
  const int64_t batch = layout.batch;
  if (batch == 0) return;
  if (!x.is_cpu()) return run_rows(0, batch);
  // At least ~32K multiply-adds per step and thread, below which the rows stay on one.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(1, row_cost));
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (batch + grain - 1) / grain));
  // work[r]: the row steps of rows [0, r); row r runs the steps whose size exceeds r.
  std::vector<int64_t> steps_of_size(batch + 1, 0), work(batch + 1, 0);
  for (const int64_t size : layout.sizes) ++steps_of_size[size];
  int64_t length = layout.steps;
  for (int64_t row = 0; row < batch; ++row) {
    length -= steps_of_size[row];
    work[row + 1] = work[row] + length;
  }
  std::vector<int64_t> bounds(parts + 1, batch);
  for (int64_t part = 0; part < parts; ++part) {
    const auto share = [&](int64_t done) { return done * parts >= part * layout.rows; };
    bounds[part] = std::find_if(work.begin(), work.end(), share) - work.begin();
  }
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    // The worker threads do not inherit the caller's autograd state: the in-place ops
    // on views of the outputs run below autograd there as they do on the caller.
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::NoGradGuard no_grad;
    for (int64_t part = begin; part < end; ++part) run_rows(bounds[part], bounds[part + 1]);
  });
}

// Copies `rows` rows of `width` elements (row strides ld_dst, ld_src elements) on the
// device and in the dtype of `like`.
void copy_rows(void* dst, int64_t ld_dst, const void* src, int64_t ld_src, int64_t rows, int64_t width,
               const at::Tensor& like) {
  if (like.is_cpu()) {
    const int64_t element = like.element_size();
    for (int64_t row = 0; row < rows; ++row) {
      std::memcpy(static_cast<char*>(dst) + row * ld_dst * element,
                  static_cast<const char*>(src) + row * ld_src * element, width * element);
    }
    return;
  }
  at::from_blob(dst, {rows, width}, {ld_dst, 1}, like.options())
      .copy_(at::from_blob(const_cast<void*>(src), {rows, width}, {ld_src, 1}, like.options()));
}

// Raw row addresses in the dense buffers: row `row` of step t of a [rows, width]
// step buffer, or of a [batch, width] state (inputs are only read through them).
struct RowAddress {
  const StepLayout& layout;
  int64_t element;
  char* step(const at::Tensor& buffer, int64_t width, int64_t t, int64_t row) const {
    return state(buffer, width, layout.offsets[t] + row);
  }
  char* state(const at::Tensor& buffer, int64_t width, int64_t row) const {
    return static_cast<char*>(const_cast<void*>(buffer.const_data_ptr())) + row * width * element;
  }
};

struct LayerForward {
  at::Tensor output;  // layout.shape(H or P)
  at::Tensor cells;   // LSTM: layout.shape(H)
  at::Tensor gates;   // LSTM: layout.shape(4H), the activated gates
};

// Checked arguments in, the step loop: one GEMM projects the inputs of all timesteps
// and adds the biases, then per step the recurrent GEMM accumulates into that step's
// rows and the fused pointwise kernel finishes them.
// With a projection (w_hr defined), the kernel's h goes to a [B, H] buffer and the step's
// output is h W_hr^T [B, P].
LayerForward layer_forward(const Launchers& launch, Cell cell, const StepLayout& layout, const at::Tensor& input,
                           const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                           const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                           const std::optional<at::Tensor>& b_hh, const at::Tensor& w_hr = at::Tensor()) {
  const int64_t input_size = input.size(input.dim() - 1);
  const int64_t gate_width = w_hh.size(0), hidden = gate_width / gate_count(cell);
  const int64_t output_size = w_hr.defined() ? w_hr.size(0) : hidden;
  const at::Tensor x = input.contiguous();
  const std::unique_ptr<StepMatmul> recurrent = launch.make_step_matmul(w_hh.t());
  const at::Tensor x2d = x.view({layout.rows, input_size});
  const at::Tensor bias = combined_bias(b_ih, b_hh);
  at::Tensor gates = at::empty({layout.rows, gate_width}, x.options());
  if (bias.defined()) {
    launch.matmul_bias_out(gates, x2d, w_ih.t(), bias);
  } else {
    launch.matmul_out(gates, x2d, w_ih.t(), /*accumulate=*/false);
  }
  at::Tensor output = at::empty(layout.shape(output_size), x.options());
  at::Tensor cells = is_lstm(cell) ? at::empty(layout.shape(hidden), x.options()) : at::Tensor();
  const std::unique_ptr<StepMatmul> projection = w_hr.defined() ? launch.make_step_matmul(w_hr.t()) : nullptr;
  at::Tensor h_full = w_hr.defined() ? at::empty({layout.batch, hidden}, x.options()) : at::Tensor();

  const DType dtype = kernel_dtype(x, "rnn", "input");
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor c0 = is_lstm(cell) ? cx.contiguous() : at::Tensor();
  const RowAddress at_row{layout, x.element_size()};
  // The whole time loop for batch rows [row_begin, row_end): every step of a row only
  // reads that row's state, so the rows can run the sequence independently.
  auto run_rows = [&](int64_t row_begin, int64_t row_end) {
    ForwardArgs args;
    args.cell = cell;
    args.dtype = dtype;
    args.hidden = hidden;
    for (int64_t i = 0; i < layout.steps; ++i) {
      const int64_t t = layout.nth(i, /*forward_order=*/true), p = layout.previous(t);
      layout.for_each_run(t, row_begin, row_end, [&](int64_t r0, int64_t r1, bool from_initial) {
        const void* h_prev = from_initial ? at_row.state(h0, output_size, r0) : at_row.step(output, output_size, p, r0);
        void* z = at_row.step(gates, gate_width, t, r0);
        void* out_t = at_row.step(output, output_size, t, r0);
        recurrent->run(h_prev, output_size, r1 - r0, z, gate_width, /*accumulate=*/true);
        args.batch = r1 - r0;
        args.gates = z;
        args.hy = projection ? at_row.state(h_full, hidden, r0) : out_t;
        if (is_lstm(cell)) {
          args.cx = from_initial ? at_row.state(c0, hidden, r0) : at_row.step(cells, hidden, p, r0);
          args.cy = at_row.step(cells, hidden, t, r0);
        }
        launch.forward(args);
        if (projection) projection->run(args.hy, hidden, r1 - r0, out_t, output_size, /*accumulate=*/false);
      });
    }
  };
  run_rows_split(x, layout, gate_width * output_size, run_rows);
  return {output, cells, is_lstm(cell) ? gates.view(layout.shape(gate_width)) : at::Tensor()};
}

struct LayerBackward {
  at::Tensor grad_input, grad_hx, grad_cx, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr;
};

// The gradients autograd asks for beyond the states': the input's (one GEMM over all
// steps) and the weights' and biases' (one GEMM and its [x_t | h_prev | 1] operand).
// One left out comes back with shape [0].
struct GradsWanted {
  bool input = true;
  bool weights = true;
};

// The reverse step loop: per step the fused pointwise backward turns the gradients at
// h' (and c') into d loss / d z, and one GEMM carries d z back to h; the input and
// weight gradients are three large GEMMs over all timesteps after the loop.
// `output` is only read for the states steps continue (LSTM) and the activation (RNN).
// With a projection, the gradient at each step's output (P wide) is kept for the
// weight gradient of w_hr and carried through W_hr to the kernel's h; the
// unprojected h = o tanh(c') is recomputed from the saved gates and cells.
LayerBackward layer_backward(const Launchers& launch, Cell cell, const StepLayout& layout,
                             const at::Tensor& grad_output, const at::Tensor& grad_cells, const at::Tensor& input,
                             const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& cells,
                             const at::Tensor& gates, bool has_bias, GradsWanted wanted = {},
                             const at::Tensor& w_hr = at::Tensor()) {
  const int64_t rows = layout.rows, batch = layout.batch, input_size = input.size(input.dim() - 1);
  const int64_t gate_width = w_hh.size(0), hidden = gate_width / gate_count(cell);
  const int64_t output_size = w_hr.defined() ? w_hr.size(0) : hidden;
  const at::Tensor x = input.contiguous();
  const at::Tensor dy = grad_output.contiguous();
  const at::Tensor dc_out = is_lstm(cell) ? grad_cells.contiguous() : at::Tensor();
  const at::Tensor h0 = hx.contiguous();
  const at::Tensor c0 = is_lstm(cell) ? cx.contiguous() : at::Tensor();
  const at::Tensor out = output.defined() ? output.contiguous() : at::Tensor();
  const at::Tensor cell_states = is_lstm(cell) ? cells.contiguous() : at::Tensor();
  const at::Tensor gate_values = is_lstm(cell) ? gates.contiguous() : at::Tensor();

  at::Tensor grad_gates = at::empty({rows, gate_width}, x.options());
  // d loss / d (output, c) of each batch row carried to the step its state continues;
  // zero before a row's last step.
  at::Tensor grad_h = at::zeros({batch, output_size}, x.options());
  at::Tensor grad_c = is_lstm(cell) ? at::zeros({batch, hidden}, x.options()) : at::Tensor();
  // Projection: d loss / d output of every step, and the kernel's h gradient of one step.
  at::Tensor grad_projected = w_hr.defined() ? at::empty({rows, output_size}, x.options()) : at::Tensor();
  at::Tensor grad_h_full = w_hr.defined() ? at::empty({batch, hidden}, x.options()) : at::Tensor();
  const at::Tensor no_grad_h = w_hr.defined() ? at::zeros({batch, hidden}, x.options()) : at::Tensor();
  const std::unique_ptr<StepMatmul> projection = w_hr.defined() ? launch.make_step_matmul(w_hr) : nullptr;
  const at::Tensor dy2d = dy.view({rows, output_size});

  // The weight and bias gradients come from one GEMM that reads dz once:
  // [grad_w_ih | grad_w_hh | grad_bias] = dz^T [x_t | h_prev | 1], [G*H, rows] x
  // [rows, I + P (+ 1)]: dz^T is read in place (column-major), the right factor holds
  // each row's input and the state its step started from (a column of ones sums dz).
  const int64_t bias_column = input_size + output_size;
  at::Tensor layer_inputs, h_prev;
  if (wanted.weights) {
    layer_inputs = at::empty({rows, bias_column + (has_bias ? 1 : 0)}, x.options());
    layer_inputs.narrow(1, 0, input_size).copy_(x.view({rows, input_size}));
    h_prev = layer_inputs.narrow(1, input_size, output_size);
  }
  if (wanted.weights && !layout.packed) {
    // Time-major: the outputs shifted by one step (forward: h0 first; reverse: last).
    const int64_t later = rows - batch;
    h_prev.narrow(0, layout.reverse ? later : 0, batch).copy_(h0);
    if (later > 0) {
      h_prev.narrow(0, layout.reverse ? 0 : batch, later)
          .copy_(out.view({rows, output_size}).narrow(0, layout.reverse ? batch : 0, later));
    }
  }  // packed: copied run by run in the loop below
  if (wanted.weights && has_bias) layer_inputs.select(1, bias_column).fill_(1);

  const std::unique_ptr<StepMatmul> recurrent = launch.make_step_matmul(w_hh);
  const DType dtype = kernel_dtype(x, "rnn_backward", "input");
  const RowAddress at_row{layout, x.element_size()};
  // As in the forward: each batch row's reverse loop only touches that row.
  auto run_rows = [&](int64_t row_begin, int64_t row_end) {
    BackwardArgs args;
    args.cell = cell;
    args.dtype = dtype;
    args.hidden = hidden;
    for (int64_t i = 0; i < layout.steps; ++i) {
      const int64_t t = layout.nth(i, /*forward_order=*/false), p = layout.previous(t);
      layout.for_each_run(t, row_begin, row_end, [&](int64_t r0, int64_t r1, bool from_initial) {
        const int64_t n = r1 - r0;
        void* grad_h_rows = at_row.state(grad_h, output_size, r0);
        if (projection) {
          // The gradient at the step's projected output, kept for grad_w_hr, carried
          // through W_hr to the kernel's h (a tensor op: this path is for any device).
          at::Tensor grad_step = grad_projected.narrow(0, layout.offsets[t] + r0, n);
          at::add_out(grad_step, dy2d.narrow(0, layout.offsets[t] + r0, n), grad_h.narrow(0, r0, n));
          void* grad_h_full_rows = at_row.state(grad_h_full, hidden, r0);
          projection->run(grad_step.const_data_ptr(), output_size, n, grad_h_full_rows, hidden,
                          /*accumulate=*/false);
          args.grad_hy = grad_h_full_rows;
          args.grad_hy_recurrent = at_row.state(no_grad_h, hidden, r0);
        } else {
          args.grad_hy = at_row.step(dy, output_size, t, r0);
          args.grad_hy_recurrent = grad_h_rows;
        }
        if (is_lstm(cell)) {
          void* grad_c_rows = at_row.state(grad_c, hidden, r0);
          args.grad_cy = at_row.step(dc_out, hidden, t, r0);
          args.grad_cy_recurrent = grad_c_rows;
          args.grad_cx = grad_c_rows;
          args.gates = at_row.step(gate_values, gate_width, t, r0);
          args.cx = from_initial ? at_row.state(c0, hidden, r0) : at_row.step(cell_states, hidden, p, r0);
          args.cy = at_row.step(cell_states, hidden, t, r0);
        } else {
          args.hy = at_row.step(out, output_size, t, r0);
        }
        void* grad_gates_t = at_row.step(grad_gates, gate_width, t, r0);
        args.batch = n;
        args.grad_gates = grad_gates_t;
        launch.backward(args);
        recurrent->run(grad_gates_t, gate_width, n, grad_h_rows, output_size, /*accumulate=*/false);
        if (wanted.weights && layout.packed) {
          const void* state = from_initial ? at_row.state(h0, output_size, r0) : at_row.step(out, output_size, p, r0);
          const int64_t ld = layer_inputs.size(1);
          copy_rows(at_row.step(h_prev, ld, t, r0), ld, state, output_size, n, output_size, x);
        }
      });
    }
  };
  run_rows_split(x, layout, gate_width * output_size, run_rows);

  LayerBackward result;
  const at::Tensor dz = grad_gates;
  // Every output its own tensor: an op's outputs must not alias each other.
  const auto not_computed = [&] { return at::empty({0}, x.options()); };
  result.grad_hx = grad_h;
  result.grad_cx = grad_c;
  if (wanted.input) {
    result.grad_input = at::empty({rows, input_size}, x.options());
    launch.matmul_out(result.grad_input, dz, w_ih, false);
    result.grad_input = result.grad_input.view(layout.shape(input_size));
  } else {
    result.grad_input = not_computed();
  }
  if (!wanted.weights) {
    result.grad_w_ih = not_computed();
    result.grad_w_hh = not_computed();
    result.grad_bias = not_computed();
    result.grad_w_hr = not_computed();
    return result;
  }
  at::Tensor weight_grads = at::empty({gate_width, layer_inputs.size(1)}, x.options());
  launch.matmul_out(weight_grads, dz.t(), layer_inputs, false);
  result.grad_w_ih = weight_grads.narrow(1, 0, input_size).contiguous();
  result.grad_w_hh = weight_grads.narrow(1, input_size, output_size).contiguous();
  result.grad_bias = has_bias ? weight_grads.select(1, bias_column).contiguous() : not_computed();
  if (w_hr.defined()) {
    const at::Tensor h_full =
        gate_values.narrow(gate_values.dim() - 1, 3 * hidden, hidden) * at::tanh(cell_states);
    result.grad_w_hr = at::empty({output_size, hidden}, x.options());
    launch.matmul_out(result.grad_w_hr, grad_projected.t(), h_full.reshape({rows, hidden}), false);
  } else {
    result.grad_w_hr = not_computed();
  }
  return result;
}

void check_lstm_backward_args(const char* op, const StepLayout& layout, const at::Tensor& grad_output,
                              const at::Tensor& grad_cells, const at::Tensor& input, const at::Tensor& hx,
                              const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                              const at::Tensor* output, const at::Tensor& cells, const at::Tensor& gates,
                              const at::Tensor* w_hr = nullptr) {
  check_forward_args(op, Cell::kLstm, input, layout.batch, hx, &cx, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const int64_t hidden = w_hh.size(0) / 4;
  const int64_t output_size = w_hr != nullptr ? w_hr->size(0) : hidden;
  check_shape(op, "grad_output", grad_output, layout.shape(output_size), input);
  check_shape(op, "grad_cells", grad_cells, layout.shape(hidden), input);
  if (output != nullptr) check_shape(op, "output", *output, layout.shape(output_size), input);
  check_shape(op, "cells", cells, layout.shape(hidden), input);
  check_shape(op, "gates", gates, layout.shape(4 * hidden), input);
}

void check_rnn_backward_args(const char* op, Cell cell, const StepLayout& layout, const at::Tensor& grad_output,
                             const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                             const at::Tensor& w_hh, const at::Tensor& output) {
  check_forward_args(op, cell, input, layout.batch, hx, nullptr, w_ih, w_hh, std::nullopt, std::nullopt);
  const int64_t hidden = w_hh.size(1);
  check_shape(op, "grad_output", grad_output, layout.shape(hidden), input);
  check_shape(op, "output", output, layout.shape(hidden), input);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_impl(
    const Launchers& launch, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh, const std::optional<at::Tensor>& w_hr,
    const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const char* op = "lstm_layer";
  const StepLayout layout = make_layout(op, input, batch_sizes, reverse);
  check_forward_args(op, Cell::kLstm, input, layout.batch, hx, &cx, w_ih, w_hh, b_ih, b_hh,
                     w_hr.has_value() ? &*w_hr : nullptr);
  LayerForward f = layer_forward(launch, Cell::kLstm, layout, input, hx, cx, w_ih, w_hh, b_ih, b_hh,
                                 w_hr.value_or(at::Tensor()));
  return {f.output, f.cells, f.gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_impl(const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& grad_cells,
                         const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const at::Tensor& output, const at::Tensor& cells,
                         const at::Tensor& gates, bool has_bias, const std::optional<at::Tensor>& w_hr,
                         const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad,
                         bool weight_grad) {
  const char* op = "lstm_layer_backward";
  const StepLayout layout = make_layout(op, input, batch_sizes, reverse);
  check_lstm_backward_args(op, layout, grad_output, grad_cells, input, hx, cx, w_ih, w_hh, &output, cells, gates,
                           w_hr.has_value() ? &*w_hr : nullptr);
  LayerBackward b = layer_backward(launch, Cell::kLstm, layout, grad_output, grad_cells, input, hx, cx, w_ih, w_hh,
                                   output, cells, gates, has_bias, GradsWanted{input_grad, weight_grad},
                                   w_hr.value_or(at::Tensor()));
  return {b.grad_input, b.grad_hx, b.grad_cx, b.grad_w_ih, b.grad_w_hh, b.grad_bias, b.grad_w_hr};
}

at::Tensor rnn_layer_impl(const Launchers& launch, const at::Tensor& input, const at::Tensor& hx,
                          const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                          const std::optional<at::Tensor>& b_hh, std::string_view nonlinearity,
                          const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  const char* op = "rnn_layer";
  const Cell cell = parse_nonlinearity(nonlinearity, op);
  const StepLayout layout = make_layout(op, input, batch_sizes, reverse);
  check_forward_args(op, cell, input, layout.batch, hx, nullptr, w_ih, w_hh, b_ih, b_hh);
  return layer_forward(launch, cell, layout, input, hx, at::Tensor(), w_ih, w_hh, b_ih, b_hh).output;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_impl(
    const Launchers& launch, const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& output, bool has_bias,
    std::string_view nonlinearity, const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad,
    bool weight_grad) {
  const char* op = "rnn_layer_backward";
  const Cell cell = parse_nonlinearity(nonlinearity, op);
  const StepLayout layout = make_layout(op, input, batch_sizes, reverse);
  check_rnn_backward_args(op, cell, layout, grad_output, input, hx, w_ih, w_hh, output);
  LayerBackward b = layer_backward(launch, cell, layout, grad_output, at::Tensor(), input, hx, at::Tensor(), w_ih,
                                   w_hh, output, at::Tensor(), at::Tensor(), has_bias,
                                   GradsWanted{input_grad, weight_grad});
  return {b.grad_input, b.grad_hx, b.grad_w_ih, b.grad_w_hh, b.grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_impl(
    const Launchers& launch, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
    const std::optional<at::Tensor>& b_hh) {
  const char* op = "lstm_cell";
  check_cell_input(op, input);
  check_forward_args(op, Cell::kLstm, input, input.size(0), hx, &cx, w_ih, w_hh, b_ih, b_hh);
  LayerForward f =
      layer_forward(launch, Cell::kLstm, cell_layout(input), input.unsqueeze(0), hx, cx, w_ih, w_hh, b_ih, b_hh);
  return {f.output.squeeze(0), f.cells.squeeze(0), f.gates.squeeze(0)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_impl(
    const Launchers& launch, const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input,
    const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& gates, const at::Tensor& cy, bool has_bias) {
  const char* op = "lstm_cell_backward";
  check_cell_input(op, input);
  const at::Tensor x = input.unsqueeze(0);
  const StepLayout layout = cell_layout(input);
  check_lstm_backward_args(op, layout, grad_hy.unsqueeze(0), grad_cy.unsqueeze(0), x, hx, cx, w_ih, w_hh, nullptr,
                           cy.unsqueeze(0), gates.unsqueeze(0));
  LayerBackward b = layer_backward(launch, Cell::kLstm, layout, grad_hy.unsqueeze(0), grad_cy.unsqueeze(0), x, hx, cx,
                                   w_ih, w_hh, at::Tensor(), cy.unsqueeze(0), gates.unsqueeze(0), has_bias);
  return {b.grad_input.squeeze(0), b.grad_hx, b.grad_cx, b.grad_w_ih, b.grad_w_hh, b.grad_bias};
}

at::Tensor rnn_cell_impl(const Launchers& launch, const at::Tensor& input, const at::Tensor& hx,
                         const at::Tensor& w_ih, const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, std::string_view nonlinearity) {
  const char* op = "rnn_cell";
  const Cell cell = parse_nonlinearity(nonlinearity, op);
  check_cell_input(op, input);
  check_forward_args(op, cell, input, input.size(0), hx, nullptr, w_ih, w_hh, b_ih, b_hh);
  return layer_forward(launch, cell, cell_layout(input), input.unsqueeze(0), hx, at::Tensor(), w_ih, w_hh, b_ih, b_hh)
      .output.squeeze(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_impl(
    const Launchers& launch, const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& hy, bool has_bias,
    std::string_view nonlinearity) {
  const char* op = "rnn_cell_backward";
  const Cell cell = parse_nonlinearity(nonlinearity, op);
  check_cell_input(op, input);
  const at::Tensor x = input.unsqueeze(0);
  const StepLayout layout = cell_layout(input);
  check_rnn_backward_args(op, cell, layout, grad_hy.unsqueeze(0), x, hx, w_ih, w_hh, hy.unsqueeze(0));
  LayerBackward b = layer_backward(launch, cell, layout, grad_hy.unsqueeze(0), at::Tensor(), x, hx, at::Tensor(), w_ih,
                                   w_hh, hy.unsqueeze(0), at::Tensor(), at::Tensor(), has_bias);
  return {b.grad_input.squeeze(0), b.grad_hx, b.grad_w_ih, b.grad_w_hh, b.grad_bias};
}

// ---- CPU ---------------------------------------------------------------------------

namespace {

// Batch rows per parallel task: at least ~16K elements of the gate matrix, below which
// waking the second thread costs more than the pointwise pass itself.
int64_t grain_rows(Cell cell, int64_t hidden) {
  return std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, gate_count(cell) * hidden));
}

void forward_cpu(const ForwardArgs& args) {
  const CpuKernels& kernels = rnn_cpu_kernels_select();
  at::parallel_for(0, args.batch, grain_rows(args.cell, args.hidden),
                   [&](int64_t begin, int64_t end) { kernels.forward(args, begin, end); });
}

void backward_cpu(const BackwardArgs& args) {
  const CpuKernels& kernels = rnn_cpu_kernels_select();
  at::parallel_for(0, args.batch, grain_rows(args.cell, args.hidden),
                   [&](int64_t begin, int64_t end) { kernels.backward(args, begin, end); });
}

// float32 and float64 GEMMs on the packed micro-kernel of rnn_cpu_kernel.cpp (see there
// for why); other dtypes through ATen.

// Rows per task of the large GEMMs: a row block of A (96 x 256 floats) stays in L2 while
// the task sweeps its panel (the kernel walks k in L1-sized chunks).
constexpr int64_t kGemmRowBlock = 96;

int64_t gemm_grain(int64_t rows, int64_t depth, int64_t width) {
  // Tasks per parallel chunk: at least ~1 MFLOP each.
  return std::max<int64_t>(1, (int64_t{1} << 20) / std::max<int64_t>(1, 2 * rows * depth * width));
}

// Rows per task: at most kGemmRowBlock, in a number of equal blocks that is a multiple
// of the thread count, so that at::parallel_for's even split of the tasks gives every
// thread whole blocks of the same size, and at least four tasks per thread while blocks
// can shrink. The weight gradients' [4H, I + H + 1] result at H = 50 (200 rows, 4
// panels) ran as blocks of 96, 96 and 8 rows, split 3.6 : 1 between two threads; now
// four blocks of 50.
int64_t gemm_row_block(int64_t m, int64_t panels) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  for (int64_t blocks = threads;; blocks += threads) {
    const int64_t row_block = (m + blocks - 1) / blocks;
    if (row_block <= 6) return 6;
    if (row_block <= kGemmRowBlock && panels * blocks >= 4 * threads) return row_block;
  }
}

void run_gemm_tasks(const CpuKernels& kernels, const GemmArgs& args) {
  const int64_t width = kernels.gemm_panel_width(args.dtype);
  const int64_t panels = (args.n + width - 1) / width;
  const int64_t tasks = panels * ((args.m + args.row_block - 1) / args.row_block);
  at::parallel_for(0, tasks, gemm_grain(std::min(args.m, args.row_block), args.k, width),
                   [&](int64_t begin, int64_t end) { kernels.gemm(args, begin, end); });
}

bool has_packed_gemm(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// dst = src for a row-major dst (stride(1) == 1) and a column-major src (stride(0) == 1,
// a transposed view), float32 or float64: the per-ISA blocked transpose, split over
// threads by 16 destination rows. ATen's copy_ walked such a pair at ~4 GB/s: 0.83 ms
// of the LSTM train step at H = 256 went to transposing the weight gradients' [385 x
// 2048] operand.
void copy_transposed(at::Tensor dst, const at::Tensor& src) {
  const CpuKernels& kernels = rnn_cpu_kernels_select();
  const DType dtype = kernel_dtype(dst, "rnn", "dst");
  const int64_t rows = dst.size(0), cols = dst.size(1), element = dst.element_size();
  const auto* from = static_cast<const char*>(src.const_data_ptr());
  auto* to = static_cast<char*>(dst.mutable_data_ptr());
  const int64_t lds = src.stride(1), ldd = dst.stride(0);
  constexpr int64_t kBlockRows = 16;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  // At least ~16K elements per parallel chunk.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, kBlockRows * cols));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    const int64_t r0 = begin * kBlockRows, r1 = std::min(rows, end * kBlockRows);
    kernels.transpose(dtype, from + r0 * element, lds, cols, r1 - r0, to + r0 * ldd * element, ldd);
  });
}

bool is_transposed_pair(const at::Tensor& dst, const at::Tensor& src) {
  return dst.dim() == 2 && dst.stride(1) == 1 && src.stride(0) == 1 && src.stride(1) >= src.size(0) &&
         dst.scalar_type() == src.scalar_type() && has_packed_gemm(dst);
}

// B[k, n] packed into column panels (see GemmArgs), the panels shared between the threads.
at::Tensor pack_b_parallel(const CpuKernels& kernels, const at::Tensor& b) {
  const DType dtype = kernel_dtype(b, "rnn", "b");
  const int64_t k = b.size(0), n = b.size(1), width = kernels.gemm_panel_width(dtype);
  const int64_t panels = (n + width - 1) / width;
  at::Tensor packed = at::empty({panels * k * width}, b.options());
  const auto* src = static_cast<const char*>(b.const_data_ptr());
  auto* dst = static_cast<char*>(packed.mutable_data_ptr());
  const int64_t element = b.element_size();
  const int64_t stride_k = b.stride(0), stride_n = b.stride(1);
  // At least ~16K elements per parallel chunk.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(1, k * width));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    const int64_t col = begin * width;
    kernels.pack_b(dtype, src + col * stride_n * element, k, std::min(n, end * width) - col, stride_k, stride_n,
                   dst + begin * k * width * element);
  });
  return packed;
}

class PackedStepMatmul final : public StepMatmul {
 public:
  explicit PackedStepMatmul(const at::Tensor& b)
      : kernels_(rnn_cpu_kernels_select()), dtype_(kernel_dtype(b, "rnn", "b")), k_(b.size(0)), n_(b.size(1)) {
    const int64_t width = kernels_.gemm_panel_width(dtype_);
    packed_ = at::empty({(n_ + width - 1) / width * k_ * width}, b.options());
    kernels_.pack_b(dtype_, b.const_data_ptr(), k_, n_, b.stride(0), b.stride(1), packed_.mutable_data_ptr());
  }

  void run(const void* a, int64_t lda, int64_t m, void* c, int64_t ldc, bool accumulate) override {
    GemmArgs args;
    args.dtype = dtype_;
    args.a = a;
    args.lda = lda;
    args.packed_b = packed_.const_data_ptr();
    args.c = c;
    args.ldc = ldc;
    args.m = m;
    args.n = n_;
    args.k = k_;
    // Split the rows between the threads too: a thin n (the backward's dz W_hh has
    // n = hidden) leaves too few panels to share. Inside a parallel region (the layer
    // loops' rows per thread) the tasks run on this thread: one block of all rows
    // reads each panel of B once per step instead of once per block.
    const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
    const int64_t rows_per_thread = (args.m + threads - 1) / threads;
    args.row_block = std::max<int64_t>(6, (rows_per_thread + 5) / 6 * 6);
    args.accumulate = accumulate;
    if (args.m == 0 || args.n == 0) return;
    if (args.k == 0) {
      const int64_t element = packed_.element_size();
      for (int64_t row = 0; row < m && !accumulate; ++row) {
        std::memset(static_cast<char*>(c) + row * ldc * element, 0, n_ * element);
      }
      return;
    }
    run_gemm_tasks(kernels_, args);
  }

 private:
  const CpuKernels& kernels_;
  DType dtype_;
  int64_t k_, n_;
  at::Tensor packed_;
};

std::unique_ptr<StepMatmul> make_step_matmul_cpu(const at::Tensor& b) {
  if (has_packed_gemm(b)) return std::make_unique<PackedStepMatmul>(b);
  return make_aten_step_matmul(b);
}

// c (+)= a b (+ bias), float32 or float64, c dense row-major: A read in place when it
// is row-major, or column-major with columns under 1 KB apart (a transposed view, e.g.
// dz^T of the weight gradients at small H), else copied; B packed whole (in parallel), then one parallel pass of tiles. A defined bias
// [n] starts every row's sums (accumulate must be false).
void packed_matmul_out(at::Tensor c, const at::Tensor& a_in, const at::Tensor& b, bool accumulate,
                       const at::Tensor& bias = at::Tensor()) {
  const CpuKernels& kernels = rnn_cpu_kernels_select();
  const bool column_major = a_in.stride(0) == 1 && a_in.stride(1) != 1 && a_in.size(1) > 1 &&
                            a_in.stride(1) * a_in.element_size() < 1024;  // see matmul_out_cpu
  // A copied row-major gets rows padded by 64 bytes: rows a multiple of 4 KB apart
  // (k = 2048 floats: the transposed weight-gradient product at H = 256) put the six
  // rows a register tile broadcasts from into one L1 set; padded, that product took
  // 4.65 ms instead of 4.9.
  at::Tensor a = a_in;
  if (a_in.stride(1) != 1 && !column_major) {
    const int64_t ld = (a_in.size(1) + 15) / 16 * 16 + 16;
    a = at::empty({a_in.size(0), ld}, a_in.options()).narrow(1, 0, a_in.size(1));
    if (is_transposed_pair(a, a_in)) {
      copy_transposed(a, a_in);
    } else {
      a.copy_(a_in);
    }
  }
  const DType dtype = kernel_dtype(c, "rnn", "c");
  const int64_t m = a.size(0), k = a.size(1), n = b.size(1), width = kernels.gemm_panel_width(dtype);
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (bias.defined()) {
      c.copy_(bias.expand({m, n}));
    } else if (!accumulate) {
      c.zero_();
    }
    return;
  }
  const at::Tensor row_bias = bias.defined() ? bias.contiguous() : at::Tensor();
  const at::Tensor packed = pack_b_parallel(kernels, b);
  GemmArgs args;
  args.dtype = dtype;
  args.a = a.const_data_ptr();
  args.a_column_major = column_major;
  args.lda = column_major ? a.stride(1) : a.stride(0);
  args.packed_b = packed.const_data_ptr();
  args.c = c.mutable_data_ptr();
  args.ldc = c.stride(0);
  args.m = m;
  args.n = n;
  args.k = k;
  args.row_block = gemm_row_block(m, (n + width - 1) / width);
  args.accumulate = accumulate;
  args.bias = row_bias.defined() ? row_bias.const_data_ptr() : nullptr;
  run_gemm_tasks(kernels, args);
}

void matmul_out_cpu(at::Tensor c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if (!has_packed_gemm(c)) return aten_matmul_out(c, a, b, accumulate);
  const int64_t m = a.size(0), n = b.size(1);
  // A transposed view (column-major A) is read in place while its columns lie close
  // together (the weight gradients' dz^T at H = 50: 800 bytes apart). From 1 KB apart
  // every step of the k-loop touches another page and, at 4 KB, the same L1 set: the
  // weight gradients at H = 256 ran at 54% of the FMA peak that way. Then c^T = b^T a^T
  // is computed instead when b^T is the smaller copy, a^T (row-major) packed as B.
  const bool far_columns = a.stride(1) != 1 && a.stride(1) * a.element_size() >= 1024;
  if ((a.stride(0) != 1 || far_columns) && a.stride(1) != 1 && n < m) {
    at::Tensor c_t = at::empty({n, m}, c.options());
    packed_matmul_out(c_t, b.t(), a.t(), false);
    if (accumulate) {
      c.add_(c_t.t());
    } else if (is_transposed_pair(c, c_t.t())) {
      copy_transposed(c, c_t.t());
    } else {
      c.copy_(c_t.t());
    }
    return;
  }
  packed_matmul_out(c, a, b, accumulate);
}

void matmul_bias_out_cpu(at::Tensor c, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias) {
  if (!has_packed_gemm(c)) return aten_matmul_bias_out(c, a, b, bias);
  packed_matmul_out(c, a, b, /*accumulate=*/false, bias);
}

constexpr Launchers kCpuLaunchers{&forward_cpu, &backward_cpu, &make_step_matmul_cpu, &matmul_out_cpu,
                                  &matmul_bias_out_cpu};

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_cell_cpu(const at::Tensor& input, const at::Tensor& hx,
                                                             const at::Tensor& cx, const at::Tensor& w_ih,
                                                             const at::Tensor& w_hh,
                                                             const std::optional<at::Tensor>& b_ih,
                                                             const std::optional<at::Tensor>& b_hh) {
  return lstm_cell_impl(kCpuLaunchers, input, hx, cx, w_ih, w_hh, b_ih, b_hh);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lstm_cell_backward_cpu(
    const at::Tensor& grad_hy, const at::Tensor& grad_cy, const at::Tensor& input, const at::Tensor& hx,
    const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& gates,
    const at::Tensor& cy, bool has_bias) {
  return lstm_cell_backward_impl(kCpuLaunchers, grad_hy, grad_cy, input, hx, cx, w_ih, w_hh, gates, cy, has_bias);
}

at::Tensor rnn_cell_cpu(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                        const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                        const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity) {
  return rnn_cell_impl(kCpuLaunchers, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_cell_backward_cpu(
    const at::Tensor& grad_hy, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& hy, bool has_bias, c10::string_view nonlinearity) {
  return rnn_cell_backward_impl(kCpuLaunchers, grad_hy, input, hx, w_ih, w_hh, hy, has_bias, nonlinearity);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lstm_layer_cpu(
    const at::Tensor& input, const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih, const std::optional<at::Tensor>& b_hh,
    const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  return lstm_layer_impl(kCpuLaunchers, input, hx, cx, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
lstm_layer_backward_cpu(const at::Tensor& grad_output, const at::Tensor& grad_cells, const at::Tensor& input,
                        const at::Tensor& hx, const at::Tensor& cx, const at::Tensor& w_ih, const at::Tensor& w_hh,
                        const at::Tensor& output, const at::Tensor& cells, const at::Tensor& gates, bool has_bias,
                        const std::optional<at::Tensor>& w_hr, const std::optional<at::Tensor>& batch_sizes,
                        bool reverse, bool input_grad, bool weight_grad) {
  return lstm_layer_backward_impl(kCpuLaunchers, grad_output, grad_cells, input, hx, cx, w_ih, w_hh, output, cells,
                                  gates, has_bias, w_hr, batch_sizes, reverse, input_grad, weight_grad);
}

at::Tensor rnn_layer_cpu(const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
                         const at::Tensor& w_hh, const std::optional<at::Tensor>& b_ih,
                         const std::optional<at::Tensor>& b_hh, c10::string_view nonlinearity,
                         const std::optional<at::Tensor>& batch_sizes, bool reverse) {
  return rnn_layer_impl(kCpuLaunchers, input, hx, w_ih, w_hh, b_ih, b_hh, nonlinearity, batch_sizes, reverse);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hx, const at::Tensor& w_ih,
    const at::Tensor& w_hh, const at::Tensor& output, bool has_bias, c10::string_view nonlinearity,
    const std::optional<at::Tensor>& batch_sizes, bool reverse, bool input_grad, bool weight_grad) {
  return rnn_layer_backward_impl(kCpuLaunchers, grad_output, input, hx, w_ih, w_hh, output, has_bias, nonlinearity,
                                 batch_sizes, reverse, input_grad, weight_grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastlayers, CPU, m) {
  m.impl("lstm_cell", &lstm_cell_cpu);
  m.impl("lstm_cell_backward", &lstm_cell_backward_cpu);
  m.impl("rnn_cell", &rnn_cell_cpu);
  m.impl("rnn_cell_backward", &rnn_cell_backward_cpu);
  m.impl("lstm_layer", &lstm_layer_cpu);
  m.impl("lstm_layer_backward", &lstm_layer_backward_cpu);
  m.impl("rnn_layer", &rnn_layer_cpu);
  m.impl("rnn_layer_backward", &rnn_layer_backward_cpu);
}

}  // namespace fastlayers::rnn

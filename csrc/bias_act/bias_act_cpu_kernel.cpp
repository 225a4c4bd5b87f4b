// bias_act CPU kernels. Compiled once per ISA into namespace fastlayers::FL_CPU_NS
// (see csrc/cmake/FastlayersCpuKernels.cmake); the inner loops are plain C++ that the
// compiler vectorizes at the ISA's width (`omp simd`), the math in bias_act_math.h.
// Parallelism lives in the caller (at::parallel_for over units).
#include <algorithm>

#include "bias_act/bias_act_kernel.h"
#include "common/cpu_scalar.h"

namespace fastlayers::FL_CPU_NS {
namespace {

using bias_act::Activation;
using bias_act::BackwardArgs;
using bias_act::ForwardArgs;
using cpu::compute_t;
using cpu::load;
using cpu::store;

// Added where there is no bias: x + (-0.0) == x for every x, -0.0 included (+0.0 is not).
template <class T> constexpr T kNoBias = T(-0.0);

template <Activation A, class S>
void forward_typed(const ForwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const S* in = static_cast<const S*>(args.input);
  const S* bias = static_cast<const S*>(args.bias);
  S* out = static_cast<S*>(args.output);
  const int64_t channels = args.shape.channels;
  const int64_t inner = args.shape.inner;
  if (inner > 1) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T b = bias ? T(load(bias[plane % channels])) : kNoBias<T>;
      const S* src = in + plane * inner;
      S* dst = out + plane * inner;
#pragma omp simd
      for (int64_t j = 0; j < inner; ++j) {
        dst[j] = store<S>(bias_act::activation_forward<A, T>(T(load(src[j])) + b));
      }
    }
  } else {
    for (int64_t row = begin; row < end; ++row) {
      const S* src = in + row * channels;
      S* dst = out + row * channels;
      if (bias) {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = store<S>(bias_act::activation_forward<A, T>(T(load(src[c])) + T(load(bias[c]))));
        }
      } else {
#pragma omp simd
        for (int64_t c = 0; c < channels; ++c) {
          dst[c] = store<S>(bias_act::activation_forward<A, T>(T(load(src[c]))));
        }
      }
    }
  }
}

// d loss / d z for one element, from the saved tensor (output y or input x) and bias b.
template <Activation A, class T>
FL_INLINE T grad_z(T grad_out, T saved, T b) {
  if constexpr (bias_act::saves_output(A)) {
    return grad_out * bias_act::activation_grad_from_output<A, T>(saved);
  } else {
    return grad_out * bias_act::activation_grad_from_input<A, T>(saved + b);
  }
}

template <Activation A, class S>
void backward_typed(const BackwardArgs& args, int64_t begin, int64_t end) {
  using T = compute_t<S>;
  const S* grad_out = static_cast<const S*>(args.grad_output);
  const S* saved = static_cast<const S*>(args.saved);
  const S* bias = static_cast<const S*>(args.bias);
  S* grad_in = static_cast<S*>(args.grad_input);
  double* partials = static_cast<double*>(args.bias_partials);
  const int64_t channels = args.shape.channels;
  const int64_t inner = args.shape.inner;
  if (inner > 1) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const T b = bias ? T(load(bias[plane % channels])) : kNoBias<T>;
      const int64_t offset = plane * inner;
      T sum = 0;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < inner; ++j) {
        T g = grad_z<A, T>(T(load(grad_out[offset + j])), T(load(saved[offset + j])), b);
        grad_in[offset + j] = store<S>(g);
        sum += g;
      }
      // Plane p = (outer o, channel c) is element p of the [outer, channels] partials.
      if (partials) partials[plane] = sum;
    }
  } else {
    const int64_t rows = args.shape.outer;
    for (int64_t group = begin; group < end; ++group) {
      double* group_sums = partials ? partials + group * channels : nullptr;
      if (group_sums) {
        for (int64_t c = 0; c < channels; ++c) group_sums[c] = 0.0;
      }
      const int64_t row_end = std::min(rows, (group + 1) * args.rows_per_group);
      for (int64_t row = group * args.rows_per_group; row < row_end; ++row) {
        const int64_t offset = row * channels;
        if (group_sums) {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            T g = grad_z<A, T>(T(load(grad_out[offset + c])), T(load(saved[offset + c])),
                               T(load(bias[c])));
            grad_in[offset + c] = store<S>(g);
            group_sums[c] += double(g);
          }
        } else {
#pragma omp simd
          for (int64_t c = 0; c < channels; ++c) {
            grad_in[offset + c] =
                store<S>(grad_z<A, T>(T(load(grad_out[offset + c])), T(load(saved[offset + c])), kNoBias<T>));
          }
        }
      }
    }
  }
}

template <template <Activation, class> class Body, class Args>
void dispatch(const Args& args, int64_t begin, int64_t end) {
  cpu::dispatch_dtype(args.dtype, [&](auto storage) {
    using S = decltype(storage);
    switch (args.activation) {
      case Activation::kIdentity: Body<Activation::kIdentity, S>::run(args, begin, end); break;
      case Activation::kRelu: Body<Activation::kRelu, S>::run(args, begin, end); break;
      case Activation::kGelu: Body<Activation::kGelu, S>::run(args, begin, end); break;
      case Activation::kSilu: Body<Activation::kSilu, S>::run(args, begin, end); break;
      case Activation::kTanh: Body<Activation::kTanh, S>::run(args, begin, end); break;
      case Activation::kSigmoid: Body<Activation::kSigmoid, S>::run(args, begin, end); break;
    }
  });
}

template <Activation A, class S> struct ForwardBody {
  static void run(const ForwardArgs& a, int64_t b, int64_t e) { forward_typed<A, S>(a, b, e); }
};
template <Activation A, class S> struct BackwardBody {
  static void run(const BackwardArgs& a, int64_t b, int64_t e) { backward_typed<A, S>(a, b, e); }
};

void forward(const ForwardArgs& args, int64_t begin, int64_t end) {
  dispatch<ForwardBody>(args, begin, end);
}
void backward(const BackwardArgs& args, int64_t begin, int64_t end) {
  dispatch<BackwardBody>(args, begin, end);
}

}  // namespace

extern const bias_act::CpuKernels bias_act_cpu_kernels;
const bias_act::CpuKernels bias_act_cpu_kernels = {&forward, &backward};

}  // namespace fastlayers::FL_CPU_NS

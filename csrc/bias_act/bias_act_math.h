// fused bias + activation, per element: y = act(x + b).
//
// Shared by the CPU kernels and the CUDA kernels. The backward works from what the
// forward saved: the output y for activations whose derivative is a function of y
// (identity, relu, tanh, sigmoid), else the input x (gelu, silu), from which
// z = x + b is recomputed; so no pre-activation tensor is ever stored.
#pragma once

#include "common/macros.h"
#include "common/math.h"

namespace fastlayers::bias_act {

enum class Activation : int { kIdentity = 0, kRelu = 1, kGelu = 2, kSilu = 3, kTanh = 4, kSigmoid = 5 };

// True when the backward needs the forward's output; false when it needs its input.
constexpr bool saves_output(Activation act) {
  return act == Activation::kIdentity || act == Activation::kRelu || act == Activation::kTanh ||
         act == Activation::kSigmoid;
}

template <Activation A, class T>
FL_HOST_DEVICE FL_INLINE T activation_forward(T z) {
  if constexpr (A == Activation::kIdentity) {
    return z;
  } else if constexpr (A == Activation::kRelu) {
    return z < T(0) ? T(0) : z;  // keeps NaN, as torch.relu does
  } else if constexpr (A == Activation::kGelu) {
    // gelu(z) = z Phi(z) = z/2 erfc(-z/sqrt2); erfc keeps full relative accuracy in the
    // negative tail, where 1 + erf(z/sqrt2) cancels.
    constexpr T kInvSqrt2 = T(0.70710678118654752440);
    return T(0.5) * z * math::erfc(-z * kInvSqrt2);
  } else if constexpr (A == Activation::kSilu) {
    return z / (T(1) + math::exp(-z));
  } else if constexpr (A == Activation::kTanh) {
    return math::tanh(z);
  } else {
    return math::sigmoid(z);
  }
}

// d act / d z, from the saved output y (saves_output(A)).
template <Activation A, class T>
FL_HOST_DEVICE FL_INLINE T activation_grad_from_output(T y) {
  if constexpr (A == Activation::kIdentity) {
    return T(1);
  } else if constexpr (A == Activation::kRelu) {
    return y <= T(0) ? T(0) : T(1);  // as torch's threshold_backward: NaN passes grad
  } else if constexpr (A == Activation::kTanh) {
    return T(1) - y * y;
  } else {
    static_assert(A == Activation::kSigmoid, "activation saves its input");
    return y * (T(1) - y);
  }
}

// d act / d z, from the pre-activation z (!saves_output(A)).
template <Activation A, class T>
FL_HOST_DEVICE FL_INLINE T activation_grad_from_input(T z) {
  if constexpr (A == Activation::kGelu) {
    // gelu'(z) = Phi(z) + z phi(z)
    constexpr T kInvSqrt2 = T(0.70710678118654752440);
    constexpr T kInvSqrt2Pi = T(0.39894228040143267794);
    return T(0.5) * math::erfc(-z * kInvSqrt2) + z * kInvSqrt2Pi * math::exp(T(-0.5) * z * z);
  } else {
    static_assert(A == Activation::kSilu, "activation saves its output");
    T s = math::sigmoid(z);
    return s * (T(1) + z * (T(1) - s));
  }
}

}  // namespace fastlayers::bias_act

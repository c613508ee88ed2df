// Shared argument checks and dtype dispatch for every comet op (CPU and CUDA).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <string>

namespace comet {

// Every user-facing check names the op, the argument, what was expected and what came.
#define COMET_CHECK(cond, op, ...) TORCH_CHECK(cond, "comet::", op, ": ", __VA_ARGS__)

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "(";
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i) s += ", ";
    s += std::to_string(t.size(i));
  }
  return s + ")";
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  COMET_CHECK(t.defined(), op, "argument '", name, "' is undefined");
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* op, const char* name,
                      const char* layout) {
  COMET_CHECK(t.dim() == dim, op, "'", name, "' must be ", dim, "-D ", layout, ", got shape ",
              shape_str(t));
}

inline void check_float(const at::Tensor& t, const char* op, const char* name) {
  const auto st = t.scalar_type();
  COMET_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble, op,
              "'", name, "' must be float32, bfloat16, float16 or float64, got ", st);
}

inline void check_same_dtype(const at::Tensor& t, const at::Tensor& ref, const char* op,
                             const char* name, const char* ref_name) {
  COMET_CHECK(t.scalar_type() == ref.scalar_type(), op, "'", name, "' has dtype ", t.scalar_type(),
              " but '", ref_name, "' has dtype ", ref.scalar_type(), "; they must match");
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  COMET_CHECK(t.device() == ref.device(), op, "'", name, "' is on ", t.device(), " but '", ref_name,
              "' is on ", ref.device(), "; they must be on the same device");
}

inline void check_last_contiguous(const at::Tensor& t, const char* op, const char* name) {
  COMET_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, "'", name,
              "' must have unit stride in its last dimension, got strides ", t.strides());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op,
                       const char* name, const char* what) {
  COMET_CHECK(t.size(dim) == expected, op, "'", name, "' must have ", what, " = ", expected,
              " in dim ", dim, ", got shape ", shape_str(t));
}

// Per-sample lengths: int32/int64 of shape (B,) on the data's device.
inline void check_lengths(const at::Tensor& t, int64_t batch, const at::Tensor& ref, const char* op,
                          const char* name) {
  COMET_CHECK(t.scalar_type() == at::kLong || t.scalar_type() == at::kInt, op, "'", name,
              "' must be int64 or int32, got ", t.scalar_type());
  COMET_CHECK(t.dim() == 1 && t.size(0) == batch, op, "'", name, "' must have shape (", batch,
              ",) (one length per sample), got ", shape_str(t));
  check_same_device(t, ref, op, name, "the data tensors");
}

}  // namespace comet

// float32 / float16 / bfloat16, plus float64 for gradcheck.
#define COMET_DISPATCH_FLOATING(TYPE, NAME, ...)                       \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, \
                                  __VA_ARGS__)

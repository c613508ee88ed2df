// The one schema file of the `comet` op library. Backends (csrc/cpu/*.cpp,
// csrc/cuda/*.cu) only register implementations; comet_ext/ops.py adds the fake
// kernels and autograd. Shapes: B batch, N chunk (query) rows, K = P + N key rows,
// Hq / Hkv heads, D head dim, M rows, d hidden, r adapter rank, C FIFO capacity.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing comet_ext._C only has to load this library: the static TORCH_LIBRARY
// initialisers below register every op with the dispatcher.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(comet, m) {
  // q (B,N,Hq,D), k/v (B,K,Hkv,D) -> out (B,N,Hq,D), lse (B,Hq,N) in fp32 (fp64 for fp64).
  // Query i < q_lens[b] sees key j < k_lens[b] iff j <= k_lens[b] - q_lens[b] + i.
  m.def(
      "prefix_attention(Tensor q, Tensor k, Tensor v, float scale, Tensor? q_lens=None, "
      "Tensor? k_lens=None) -> (Tensor out, Tensor lse)");
  m.def(
      "prefix_attention_backward(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor k, Tensor v, "
      "Tensor out, Tensor lse, float scale, Tensor? q_lens=None, Tensor? k_lens=None) -> "
      "(Tensor grad_q, Tensor grad_k, Tensor grad_v)");

  // x (M,d), down (r,d), up (d,r), norm_weight (d,) -> y = n + up(down(n)), n = RMSNorm(x) or x.
  m.def("rla(Tensor x, Tensor down, Tensor up, Tensor? norm_weight, float eps) -> Tensor");
  // grad_norm_weight is an empty tensor when norm_weight is None.
  m.def(
      "rla_backward(Tensor grad_y, Tensor x, Tensor down, Tensor up, Tensor? norm_weight, "
      "float eps) -> (Tensor grad_x, Tensor grad_down, Tensor grad_up, Tensor grad_norm_weight)");

  // readout (B,n,d), state (B,n,d) or None, norm_weight (d,), gate_weight (1,2d),
  // down (r,d), up (d,r) -> new_state (B,n,d), memory = RLA(new_state) (B,n,d).
  // gate_snap in (0, 1]: a gate g > gate_snap is used as exactly 1 (1 = never).
  m.def(
      "gated_update(Tensor readout, Tensor? state, Tensor norm_weight, Tensor gate_weight, "
      "Tensor down, Tensor up, float eps, float gate_snap=1.0) -> (Tensor new_state, Tensor memory)");
  // Without a state: grad_state is an empty tensor and grad_gate_weight is zeros. A snapped
  // gate passes the gradient straight through: d(snapped g)/dz is taken as sigmoid'(z).
  m.def(
      "gated_update_backward(Tensor grad_new_state, Tensor grad_memory, Tensor readout, "
      "Tensor? state, Tensor norm_weight, Tensor gate_weight, Tensor down, Tensor up, float eps, "
      "float gate_snap=1.0) "
      "-> (Tensor grad_readout, Tensor grad_state, Tensor grad_norm_weight, "
      "Tensor grad_gate_weight, Tensor grad_down, Tensor grad_up)");

  // Ring buffer (B,C,*F) with per-sample head (oldest row) and length, int64 (B,).
  // In place: appends rows[b, :counts[b]] (rows (B,n,*F)), evicting the oldest.
  m.def(
      "fifo_push(Tensor(a!) buffer, Tensor(b!) head, Tensor(c!) length, Tensor rows, "
      "Tensor counts) -> ()");
  // Functional twin of fifo_push for autograd: returns the pushed copies.
  m.def(
      "fifo_push_functional(Tensor buffer, Tensor head, Tensor length, Tensor rows, "
      "Tensor counts) -> (Tensor buffer_out, Tensor head_out, Tensor length_out)");
  // head / length are the values before the push. -> grad_buffer (B,C,*F), grad_rows (B,n,*F)
  m.def(
      "fifo_push_backward(Tensor grad_buffer_out, Tensor head, Tensor length, Tensor counts, "
      "int num_rows) -> (Tensor grad_buffer, Tensor grad_rows)");
  // -> (B,C,*F) oldest first, zero rows past length. With cos/sin (>=C, D) and a
  // (B,C,H,D) buffer, row i gets rotate-half RoPE at table row i.
  m.def(
      "fifo_view(Tensor buffer, Tensor head, Tensor length, Tensor? cos=None, Tensor? sin=None) "
      "-> Tensor");
  m.def(
      "fifo_view_backward(Tensor grad_view, Tensor head, Tensor length, Tensor? cos=None, "
      "Tensor? sin=None) -> Tensor");
}

"""Python face of the `comet` ops: thin wrappers over ``torch.ops.comet``, their
fake (meta) kernels for torch.compile, and their autograd formulas.

Shapes: B batch, N query rows, K key rows (prefix + chunk), Hq / Hkv heads,
D head dim, M rows, d hidden, r adapter rank, C FIFO capacity.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

__all__ = [
    "prefix_attention",
    "rla",
    "gated_update",
    "fifo_empty",
    "fifo_push",
    "fifo_push_functional",
    "fifo_view",
]

_ops = torch.ops.comet


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grad(g: Optional[Tensor], like: Tensor) -> Tensor:
    """Autograd may hand us None (unused output) or an expanded view: make it dense. An empty
    expanded view stays strided under .contiguous() (it counts as contiguous), which the
    kernels' stride checks refuse: that one becomes a fresh empty tensor."""
    if g is None or g.numel() == 0:
        return torch.zeros_like(like, memory_format=torch.contiguous_format)
    return g.contiguous()


def _first_order_only(op: str) -> None:
    """Backward kernels have no backward of their own: a backward under create_graph=True (grad
    mode on) would differentiate through them as constants and give silently wrong second
    derivatives, so it is refused."""
    if torch.is_grad_enabled():
        raise NotImplementedError(f"comet::{op}: double backward (create_graph=True) is not supported; its "
                                  "backward kernel has no derivative of its own")


def _reverse_mode_only(op: str, *tensors: Optional[Tensor]) -> None:
    """The ops' derivatives are backward kernels (reverse mode). Forward mode (torch.func.jvp,
    torch.autograd.forward_ad) would run the op on the primals and drop the tangents, silently:
    refused where an argument carries one."""
    if fwAD._current_level < 0:  # no dual level is open: no tangent can exist (the common case)
        return
    if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
        raise NotImplementedError(f"comet_ext.ops.{op}: forward-mode AD (torch.func.jvp, torch.autograd.forward_ad) "
                                  "is not implemented, its tangents would be lost; differentiate in reverse mode "
                                  "(backward)")


def _none_if_empty(t: Tensor, present: bool) -> Optional[Tensor]:
    return t if present else None


# --------------------------------------------------------------------------- prefix_attention


def prefix_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: Optional[float] = None,
    q_lens: Optional[Tensor] = None,
    k_lens: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of chunk queries over ``[prefix ; chunk]`` keys, bottom-right causal.

    Args:
        q: (B, N, Hq, D) queries (the chunk's rows).
        k, v: (B, K, Hkv, D) keys / values, K = prefix + N; Hq must be a multiple of Hkv (GQA).
        scale: score scale, default ``D ** -0.5``.
        q_lens, k_lens: optional (B,) int valid lengths (right padding). Query
            ``i < q_lens[b]`` sees key ``j < k_lens[b]`` iff ``j <= k_lens[b] - q_lens[b] + i``.

    Returns:
        out (B, N, Hq, D) in q's dtype, and lse (B, Hq, N) float32 (float64 for
        float64 inputs), the log-sum-exp of each row's scaled scores. Rows that
        see no key (padding) give ``out = 0`` and ``lse = -inf``. Both outputs
        are differentiable.

    NaN / Inf: a non-finite q row poisons only its own output row; a non-finite
    visible key or value poisons every row that sees it and, as in
    FlashAttention, may also reach the other rows of the same 64-row query
    tile through the tile products (0 * NaN). Rows past ``k_lens`` are never
    read, so padding may hold garbage.

    Example::

        q = torch.randn(1, 5, 4, 64); k = v = torch.randn(1, 12, 2, 64)
        out, lse = prefix_attention(q, k, v)   # 7 prefix rows, 5 chunk rows
    """
    if scale is None:
        # Malformed q (no dims, head_dim 0) falls through to the op's own checks.
        scale = q.shape[-1] ** -0.5 if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    _reverse_mode_only("prefix_attention", q, k, v)
    return _ops.prefix_attention.default(q, k, v, float(scale), q_lens, k_lens)


def _same_device(op: str, ref_name: str, ref: Tensor, **others: Optional[Tensor]) -> None:
    """The kernels' device check, in a fake kernel: the dispatcher runs the fake kernels for a
    meta tensor among real ones too, where they would hand back uninitialised real tensors."""
    for name, t in others.items():
        if t is not None:
            torch._check(t.device == ref.device, lambda: f"comet::{op}: '{name}' is on {t.device} but '{ref_name}' "
                                                         f"is on {ref.device}; they must be on the same device")


# --------------------------------------------------------------------------- the fake kernels' argument checks
#
# csrc/checks.h and common.h in Python, check for check and message for message (one regex matches both),
# so that torch.compile / torch.export / FakeTensorMode refuse while tracing, by name, what the kernels would
# refuse at run time, instead of tracing a graph of made-up shapes. torch._check raises RuntimeError, as
# TORCH_CHECK does, and takes a symbolic condition under dynamic shapes (a guard; a deferred runtime assert
# for an unbacked size): sizes are compared and joined with & and |, which, unlike `and` / `or`, do not
# force a SymBool to a bool. Devices are checked before these, by _same_device. Left to the kernels:
# - the values inside q_lens / k_lens / counts / head / length: a fake tensor has none (the CPU kernels
#   check them, the CUDA kernels clamp them);
# - the CUDA kernels' limits (head_dim, grid size, shared memory per block), which depend on the GPU.

_SCALAR_TYPE_NAMES = {  # c10's names, as TORCH_CHECK prints a dtype
    torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
    torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
    torch.bool: "Bool", torch.complex64: "ComplexFloat", torch.complex128: "ComplexDouble",
}
_FLOATING = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_str(dtype: torch.dtype) -> str:
    return _SCALAR_TYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def _int_str(n) -> str:
    """A size or stride in a message: under dynamic shapes its example value, as the kernel would print
    it, not the symbol's name (an unbacked size has no example and keeps its name)."""
    if not isinstance(n, torch.SymInt):
        return str(n)
    try:
        from torch.fx.experimental.symbolic_shapes import guarding_hint_or_throw as hint, has_guarding_hint as has_hint
    except ImportError:  # torch < 2.14 names them so
        from torch.fx.experimental.symbolic_shapes import has_hint, size_hint as hint
    return str(hint(n) if has_hint(n) else n)


def _shape_str(t: Tensor) -> str:  # shape_str: "(2, 3)", "(3)"
    return "(" + ", ".join(_int_str(n) for n in t.shape) + ")"


def _ints_str(ns) -> str:  # an IntArrayRef as c10 prints it: "[6, 1]"
    return "[" + ", ".join(_int_str(n) for n in ns) + "]"


def _all(conds):
    return functools.reduce(operator.and_, conds, True)


def _same_shape(a: Tensor, b: Tensor):
    return a.dim() == b.dim() and _all(x == y for x, y in zip(a.shape, b.shape))


def _check(cond, op: str, message: Callable[[], str]) -> None:  # COMET_CHECK; message() only on failure
    torch._check(cond, lambda: f"comet::{op}: {message()}")


def _check_dim(t: Tensor, dim: int, op: str, name: str, layout: str) -> None:
    _check(t.dim() == dim, op, lambda: f"'{name}' must be {dim}-D {layout}, got shape {_shape_str(t)}")


def _check_float(t: Tensor, op: str, name: str) -> None:
    _check(t.dtype in _FLOATING, op,
           lambda: f"'{name}' must be float32, bfloat16, float16 or float64, got {_dtype_str(t.dtype)}")


def _check_same_dtype(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    _check(t.dtype == ref.dtype, op, lambda: f"'{name}' has dtype {_dtype_str(t.dtype)} but '{ref_name}' has dtype "
                                             f"{_dtype_str(ref.dtype)}; they must match")


def _check_same_shape(t: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    _check(_same_shape(t, ref), op,
           lambda: f"'{name}' must have the shape of {ref_name} {_shape_str(ref)}, got {_shape_str(t)}")


def _check_last_contiguous(t: Tensor, op: str, name: str) -> None:
    _check(t.dim() == 0 or (t.shape[-1] <= 1) | (t.stride(-1) == 1), op,
           lambda: f"'{name}' must have unit stride in its last dimension, got strides {_ints_str(t.stride())}")


def _check_size(t: Tensor, dim: int, expected, op: str, name: str, what: str) -> None:
    _check(t.shape[dim] == expected, op,
           lambda: f"'{name}' must have {what} = {_int_str(expected)} in dim {dim}, got shape {_shape_str(t)}")


def _check_lengths(t: Tensor, batch, op: str, name: str) -> None:
    _check(t.dtype in (torch.int64, torch.int32), op,
           lambda: f"'{name}' must be int64 or int32, got {_dtype_str(t.dtype)}")
    _check(t.dim() == 1 and t.shape[0] == batch, op,
           lambda: f"'{name}' must have shape ({_int_str(batch)},) (one length per sample), got {_shape_str(t)}")


def _check_attention_args(op, q, k, v, scale, q_lens, k_lens) -> None:
    _check_dim(q, 4, op, "q", "(batch, queries, q_heads, head_dim)")
    _check_dim(k, 4, op, "k", "(batch, keys, kv_heads, head_dim)")
    _check_dim(v, 4, op, "v", "(batch, keys, kv_heads, head_dim)")
    _check_float(q, op, "q")
    _check_same_dtype(k, q, op, "k", "q")
    _check_same_dtype(v, q, op, "v", "q")
    _check(_same_shape(k, v), op,
           lambda: f"'k' and 'v' must have the same shape, got {_shape_str(k)} and {_shape_str(v)}")
    _check_size(k, 0, q.shape[0], op, "k", "batch")
    _check_size(k, 3, q.shape[3], op, "k", "head_dim (as q)")
    _check(q.shape[3] > 0, op, lambda: f"head_dim must be positive, got q of shape {_shape_str(q)}")
    _check((q.shape[2] > 0) & (k.shape[2] > 0), op,
           lambda: f"q_heads and kv_heads must be positive, got q {_shape_str(q)} and k {_shape_str(k)}")
    _check(q.shape[2] % k.shape[2] == 0, op, lambda: f"q_heads ({_int_str(q.shape[2])}) must be a multiple of kv_heads "
                                                     f"({_int_str(k.shape[2])}) for grouped-query attention")
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_last_contiguous(t, op, name)
    _check(math.isfinite(scale), op, lambda: f"'scale' must be finite, got {scale:g}")
    for name, lens in (("q_lens", q_lens), ("k_lens", k_lens)):
        if lens is not None:
            _check_lengths(lens, q.shape[0], op, name)


def _check_attention_backward_args(op, grad_out, grad_lse, q, k, v, out, lse, scale, q_lens, k_lens) -> None:
    _check_attention_args(op, q, k, v, scale, q_lens, k_lens)
    _check_same_shape(out, q, op, "out", "q")
    _check_same_shape(grad_out, q, op, "grad_out", "q")
    B, N, Hq = q.shape[0], q.shape[1], q.shape[2]
    _check(lse.dim() == 3 and (lse.shape[0] == B) & (lse.shape[1] == Hq) & (lse.shape[2] == N), op,
           lambda: f"'lse' must have shape (batch, q_heads, queries) = ({_int_str(B)}, {_int_str(Hq)}, "
                   f"{_int_str(N)}), got {_shape_str(lse)}")
    _check_same_shape(grad_lse, lse, op, "grad_lse", "lse")
    _check_same_dtype(grad_out, q, op, "grad_out", "q")
    _check_same_dtype(out, q, op, "out", "q")
    acc = _acc_dtype(q.dtype)
    _check(lse.dtype == acc and grad_lse.dtype == acc, op,
           lambda: f"'lse' and 'grad_lse' must be {_dtype_str(acc)}, got {_dtype_str(lse.dtype)} and "
                   f"{_dtype_str(grad_lse.dtype)}")
    _check_last_contiguous(grad_out, op, "grad_out")
    _check_last_contiguous(out, op, "out")


def _check_rla_weights(op, x, x_name, down, up, norm_weight) -> None:
    """x (M, d) or (B, n, d) against an RLA's down (r, d), up (d, r) and optional norm_weight (d,)."""
    d = x.shape[-1]
    _check_dim(down, 2, op, "down", "(rank, hidden) like nn.Linear(hidden, rank).weight")
    _check_dim(up, 2, op, "up", "(hidden, rank) like nn.Linear(rank, hidden).weight")
    _check(down.shape[1] == d, op, lambda: f"'down' must have shape (rank, {_int_str(d)}) for hidden size "
                                           f"{_int_str(d)} of '{x_name}', got {_shape_str(down)}")
    _check(down.shape[0] > 0, op, lambda: f"'down' must have a positive rank, got {_shape_str(down)}")
    _check((up.shape[0] == d) & (up.shape[1] == down.shape[0]), op,
           lambda: f"'up' must have shape ({_int_str(d)}, {_int_str(down.shape[0])}), got {_shape_str(up)}")
    _check_same_dtype(down, x, op, "down", x_name)
    _check_same_dtype(up, x, op, "up", x_name)
    if norm_weight is not None:
        _check(norm_weight.dim() == 1 and norm_weight.shape[0] == d, op,
               lambda: f"'norm_weight' must have shape ({_int_str(d)},), got {_shape_str(norm_weight)}")
        _check_same_dtype(norm_weight, x, op, "norm_weight", x_name)


def _check_eps(eps: float, op: str) -> None:
    _check(math.isfinite(eps) and eps >= 0, op, lambda: f"'eps' must be finite and >= 0, got {eps:g}")


def _check_rla_args(op, x, down, up, norm_weight, eps) -> None:
    _check_dim(x, 2, op, "x", "(rows, hidden)")
    _check_float(x, op, "x")
    _check(x.shape[1] > 0, op, lambda: f"'x' must have a positive hidden size, got {_shape_str(x)}")
    _check_last_contiguous(x, op, "x")
    _check_rla_weights(op, x, "x", down, up, norm_weight)
    _check_eps(eps, op)


def _check_gradient(g: Tensor, ref: Tensor, op: str, name: str, ref_name: str) -> None:
    """A backward's incoming gradient: the shape, dtype and unit last stride of what it is the gradient of."""
    _check_same_shape(g, ref, op, name, ref_name)
    _check_same_dtype(g, ref, op, name, ref_name)
    _check_last_contiguous(g, op, name)


def _check_rla_backward_args(op, grad_y, x, down, up, norm_weight, eps) -> None:
    _check_rla_args(op, x, down, up, norm_weight, eps)
    _check_gradient(grad_y, x, op, "grad_y", "x")


def _check_gated_update_args(op, readout, state, norm_weight, gate_weight, down, up, eps, gate_snap) -> None:
    _check_dim(readout, 3, op, "readout", "(batch, slots, hidden)")
    _check_float(readout, op, "readout")
    d = readout.shape[2]
    _check(d > 0, op, lambda: f"'readout' must have a positive hidden size, got {_shape_str(readout)}")
    _check_last_contiguous(readout, op, "readout")
    if state is not None:
        _check_same_shape(state, readout, op, "state", "readout")
        _check_same_dtype(state, readout, op, "state", "readout")
        _check_last_contiguous(state, op, "state")
    _check_rla_weights(op, readout, "readout", down, up, norm_weight)
    _check(gate_weight.dim() == 2 and (gate_weight.shape[0] == 1) & (gate_weight.shape[1] == 2 * d), op,
           lambda: f"'gate_weight' must have shape (1, {_int_str(2 * d)}) like nn.Linear(2*hidden, 1).weight, "
                   f"got {_shape_str(gate_weight)}")
    _check_same_dtype(gate_weight, readout, op, "gate_weight", "readout")
    _check_eps(eps, op)
    _check(0 < gate_snap <= 1, op,
           lambda: f"'gate_snap' must be in (0, 1] (1 = gates are never snapped), got {gate_snap:g}")


def _check_gated_update_backward_args(op, grad_new_state, grad_memory, readout, state, norm_weight, gate_weight,
                                      down, up, eps, gate_snap) -> None:
    _check_gated_update_args(op, readout, state, norm_weight, gate_weight, down, up, eps, gate_snap)
    _check_gradient(grad_new_state, readout, op, "grad_new_state", "readout")
    _check_gradient(grad_memory, readout, op, "grad_memory", "readout")


def _check_fifo_state(op, buffer, head, length) -> None:
    """The ring (B, C, *F) and its int64 (B,) head and length (also the backwards' gradient rings, which
    the kernels' messages call 'buffer' too)."""
    _check(buffer.dim() >= 2, op,
           lambda: f"'buffer' must be (batch, capacity, *features), got shape {_shape_str(buffer)}")
    for name, t in (("head", head), ("length", length)):
        _check_state_tensor(op, t, name, buffer.shape[0])


def _check_state_tensor(op, t, name, batch) -> None:
    _check(t.dtype == torch.int64, op, lambda: f"'{name}' must be int64, got {_dtype_str(t.dtype)}")
    _check(t.dim() == 1 and t.shape[0] == batch, op,
           lambda: f"'{name}' must have shape ({_int_str(batch)},) (one per sample), got {_shape_str(t)}")


def _check_dense_rows(op, t, name) -> None:
    """(B, S, *F) rows copied as flat blocks: F must be dense."""
    dense, expect = True, 1
    for i in range(t.dim() - 1, 1, -1):
        dense = dense & ((t.shape[i] == 1) | (t.stride(i) == expect))
        expect = expect * t.shape[i]
    _check(dense, op, lambda: f"'{name}' must be contiguous in its feature dimensions (after batch and row), "
                              f"got strides {_ints_str(t.stride())}")
    _check_last_contiguous(t, op, name)


def _check_push_args(op, buffer, head, length, rows, counts) -> None:
    _check_fifo_state(op, buffer, head, length)
    _check(rows.dim() == buffer.dim() and (rows.shape[0] == buffer.shape[0])
           & _all(a == b for a, b in zip(rows.shape[2:], buffer.shape[2:])), op,
           lambda: f"'rows' must have shape ({_int_str(buffer.shape[0])}, n, {_ints_str(buffer.shape[2:])}) to match "
                   f"buffer {_shape_str(buffer)}, got {_shape_str(rows)}")
    _check_same_dtype(rows, buffer, op, "rows", "buffer")
    _check_lengths(counts, buffer.shape[0], op, "counts")


def _check_push_backward_args(op, grad_buffer_out, head, length, counts, num_rows) -> None:
    _check_fifo_state(op, grad_buffer_out, head, length)
    _check_lengths(counts, grad_buffer_out.shape[0], op, "counts")
    _check(num_rows >= 0, op, lambda: f"'num_rows' must be >= 0, got {_int_str(num_rows)}")


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """at::get_overlap_status(a, b) is Full or Partial: the same tensor, or two dense ones whose byte ranges
    in one storage meet. Tensors it cannot tell apart (not dense: TooHard) pass, as in the kernel, and so do
    sizes it cannot decide while tracing (data-dependent row counts: guard_or_false, not a bool that would
    stop the trace)."""
    from torch._prims_common import is_non_overlapping_and_dense_or_false as dense
    from torch.fx.experimental.symbolic_shapes import guard_or_false

    if a is b:
        return True
    if a.untyped_storage()._cdata != b.untyped_storage()._cdata:
        return False
    if guard_or_false(a.numel() == 0) or guard_or_false(b.numel() == 0) or not (dense(a) and dense(b)):
        return False
    a0, b0 = a.storage_offset() * a.element_size(), b.storage_offset() * b.element_size()
    return guard_or_false(a0 < b0 + b.numel() * b.element_size()) and guard_or_false(b0 < a0 + a.numel() * a.element_size())


def _check_inplace_push(op, buffer, head, length, rows, counts) -> None:
    """Nothing fifo_push writes may share memory with itself or with another argument: it would write what
    is still to be read. Fake tensors keep the aliasing of the real ones (as torch.compile's do while dynamo
    traces), so this refuses at trace time what the kernel would; where the push is later functionalized into
    copies, nothing is left to share."""
    _check(head.is_contiguous() and length.is_contiguous(), op,
           lambda: "'head' and 'length' must be contiguous (they are updated in place)")
    args = (("buffer", buffer), ("head", head), ("length", length), ("rows", rows), ("counts", counts))
    for w, (name, t) in enumerate(args[:3]):
        # at::has_internal_overlap's 'Yes': a stride 0 over two or more elements (an expanded tensor)
        overlaps = functools.reduce(operator.or_, ((n > 1) & (st == 0) for n, st in zip(t.shape, t.stride())),
                                    False)
        _check(torch.sym_not(overlaps), op,
               lambda: f"'{name}' has elements that share memory (an expanded tensor?); it is written in place")
        for other, u in args[w + 1:]:
            _check(not _shares_memory(t, u), op, lambda: f"'{name}' and '{other}' share memory; '{name}' is written "
                                                          "in place (pass a copy: .clone())")


def _check_view_args(op, input, name, head, length, cos, sin) -> None:
    """fifo_view / fifo_view_backward: the ring state and the optional (>= C, D) RoPE tables."""
    _check_fifo_state(op, input, head, length)
    _check_float(input, op, name)
    _check((cos is None) == (sin is None), op,
           lambda: "'cos' and 'sin' must be given together (RoPE) or both omitted")
    if cos is None:
        return
    _check(input.dim() == 4, op,
           lambda: f"with RoPE 'buffer' must be (batch, capacity, heads, head_dim), got shape {_shape_str(input)}")
    C, D = input.shape[1], input.shape[3]
    _check(D % 2 == 0, op, lambda: f"RoPE needs an even head_dim, got {_int_str(D)}")
    for table_name, table in (("cos", cos), ("sin", sin)):
        _check_rope_table(op, table, table_name, C, D)


def _check_rope_table(op, t, name, C, D) -> None:
    _check(t.dim() == 2 and (t.shape[0] >= C) & (t.shape[1] == D), op,
           lambda: f"'{name}' must have shape (>= {_int_str(C)}, {_int_str(D)}) (a row per FIFO slot), "
                   f"got {_shape_str(t)}")
    _check_float(t, op, name)


@torch.library.register_fake("comet::prefix_attention")
def _(q, k, v, scale, q_lens=None, k_lens=None):
    _same_device("prefix_attention", "q", q, k=k, v=v, q_lens=q_lens, k_lens=k_lens)
    _check_attention_args("prefix_attention", q, k, v, scale, q_lens, k_lens)
    B, N, Hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, Hq, N), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("comet::prefix_attention_backward")
def _(grad_out, grad_lse, q, k, v, out, lse, scale, q_lens=None, k_lens=None):
    _same_device("prefix_attention_backward", "q", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out,
                 lse=lse, q_lens=q_lens, k_lens=k_lens)
    _check_attention_backward_args("prefix_attention_backward", grad_out, grad_lse, q, k, v, out, lse, scale, q_lens,
                                   k_lens)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output):
    q, k, v, scale, q_lens, k_lens = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, q_lens, k_lens)
    ctx.scale = scale


def _attention_backward(ctx, grad_out, grad_lse):
    _first_order_only("prefix_attention")
    q, k, v, out, lse, q_lens, k_lens = ctx.saved_tensors
    dq, dk, dv = _ops.prefix_attention_backward.default(
        _grad(grad_out, out), _grad(grad_lse, lse), q, k, v, out, lse, ctx.scale, q_lens, k_lens
    )
    return dq, dk, dv, None, None, None


torch.library.register_autograd(
    "comet::prefix_attention", _attention_backward, setup_context=_attention_setup
)

# --------------------------------------------------------------------------- rla


def rla(
    x: Tensor,
    down: Tensor,
    up: Tensor,
    norm_weight: Optional[Tensor] = None,
    eps: float = 1e-12,
) -> Tensor:
    """Residual low-rank adapter ``y = n + up(down(n))``, ``n = RMSNorm(x) * norm_weight`` or ``x``.

    Args:
        x: (..., d).
        down: (r, d), the weight of ``nn.Linear(d, r, bias=False)``.
        up: (d, r), the weight of ``nn.Linear(r, d, bias=False)``.
        norm_weight: optional (d,) RMSNorm weight; the norm is fused when given.
        eps: RMSNorm epsilon.

    Returns:
        y with x's shape and dtype (fp32 accumulation).
    """
    if x.dim() < 1:
        raise ValueError(f"rla: 'x' must have a hidden dimension, got a {x.dim()}-D tensor")
    _reverse_mode_only("rla", x, down, up, norm_weight)
    if x.dim() == 2:
        return _ops.rla.default(x, down, up, norm_weight, float(eps))
    # (rows, hidden); hidden 0 is refused by the op, by name (reshape(-1, 0) cannot infer the rows)
    y = _ops.rla.default(x.reshape(math.prod(x.shape[:-1]), x.shape[-1]), down, up, norm_weight, float(eps))
    return y.view(x.shape)


@torch.library.register_fake("comet::rla")
def _(x, down, up, norm_weight, eps):
    _same_device("rla", "x", x, down=down, up=up, norm_weight=norm_weight)
    _check_rla_args("rla", x, down, up, norm_weight, eps)
    return x.new_empty(x.shape)


@torch.library.register_fake("comet::rla_backward")
def _(grad_y, x, down, up, norm_weight, eps):
    _same_device("rla_backward", "x", x, grad_y=grad_y, down=down, up=up, norm_weight=norm_weight)
    _check_rla_backward_args("rla_backward", grad_y, x, down, up, norm_weight, eps)
    gw = x.new_empty((x.shape[1],) if norm_weight is not None else (0,))
    return x.new_empty(x.shape), down.new_empty(down.shape), up.new_empty(up.shape), gw


def _rla_setup(ctx, inputs, output):
    x, down, up, norm_weight, eps = inputs
    ctx.save_for_backward(x, down, up, norm_weight)
    ctx.eps = eps


def _rla_backward(ctx, grad_y):
    _first_order_only("rla")
    x, down, up, norm_weight = ctx.saved_tensors
    dx, ddown, dup, dw = _ops.rla_backward.default(
        _grad(grad_y, x), x, down, up, norm_weight, ctx.eps
    )
    return dx, ddown, dup, _none_if_empty(dw, norm_weight is not None), None


torch.library.register_autograd("comet::rla", _rla_backward, setup_context=_rla_setup)

# --------------------------------------------------------------------------- gated_update


def gated_update(
    readout: Tensor,
    state: Optional[Tensor],
    norm_weight: Tensor,
    gate_weight: Tensor,
    down: Tensor,
    up: Tensor,
    eps: Optional[float] = None,
    gate_snap: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """One layer's global-memory update (docs/model.md, "What is computed"), fused.

    ``c = RMSNorm(readout) * norm_weight``; with a state,
    ``g = sigmoid(gate_weight . [c ; state])`` (one scalar per slot) and
    ``new = g * state + (1 - g) * c``; without one (first chunk) ``new = c``.

    Args:
        readout: (B, n, d) the layer's output rows at the readout tokens.
        state: (B, n, d) previous state S, or None.
        norm_weight: (d,). gate_weight: (1, 2d), weight of ``nn.Linear(2d, 1, bias=False)``.
        down: (r, d), up: (d, r): the RLA producing the next chunk's memory rows.
        eps: RMSNorm epsilon, default ``torch.finfo(dtype).eps`` of the dtype it runs in (as
            ``nn.RMSNorm``): the readout's, fp32 under autocast.
        gate_snap: in (0, 1]; a gate ``g > gate_snap`` blends as exactly 1 (the slot keeps its
            state unchanged), so a closed slot leaks nothing over thousands of updates. The
            gradient passes straight through the snap (``d snapped(g) / dz`` is taken as
            ``sigmoid'(z)``), so training still moves such gates. 1 (default) never snaps.

    Returns:
        new_state (B, n, d) and memory ``G = new + up(down(new))`` (B, n, d).
    """
    if eps is None:  # non-float readouts fall through to the op's dtype check
        dtype = readout.dtype
        if dtype in (torch.float16, torch.bfloat16) and torch.is_autocast_enabled(readout.device.type):
            dtype = torch.float32  # the op runs in fp32 under autocast (below), as nn.RMSNorm does
        eps = torch.finfo(dtype).eps if readout.is_floating_point() else 0.0
    _reverse_mode_only("gated_update", readout, state, norm_weight, gate_weight, down, up)
    return _ops.gated_update.default(readout, state, norm_weight, gate_weight, down, up, float(eps),
                                     float(gate_snap))


@torch.library.register_fake("comet::gated_update")
def _(readout, state, norm_weight, gate_weight, down, up, eps, gate_snap=1.0):
    _same_device("gated_update", "readout", readout, state=state, norm_weight=norm_weight, gate_weight=gate_weight,
                 down=down, up=up)
    _check_gated_update_args("gated_update", readout, state, norm_weight, gate_weight, down, up, eps, gate_snap)
    return readout.new_empty(readout.shape), readout.new_empty(readout.shape)


@torch.library.register_fake("comet::gated_update_backward")
def _(grad_new_state, grad_memory, readout, state, norm_weight, gate_weight, down, up, eps, gate_snap=1.0):
    _same_device("gated_update_backward", "readout", readout, grad_new_state=grad_new_state, grad_memory=grad_memory,
                 state=state, norm_weight=norm_weight, gate_weight=gate_weight, down=down, up=up)
    _check_gated_update_backward_args("gated_update_backward", grad_new_state, grad_memory, readout, state,
                                      norm_weight, gate_weight, down, up, eps, gate_snap)
    ds = readout.new_empty(readout.shape if state is not None else (0,))
    return (
        readout.new_empty(readout.shape),
        ds,
        norm_weight.new_empty(norm_weight.shape),
        gate_weight.new_empty(gate_weight.shape),
        down.new_empty(down.shape),
        up.new_empty(up.shape),
    )


def _gated_setup(ctx, inputs, output):
    readout, state, norm_weight, gate_weight, down, up, eps, gate_snap = inputs
    ctx.save_for_backward(readout, state, norm_weight, gate_weight, down, up)
    ctx.eps, ctx.gate_snap = eps, gate_snap


def _gated_backward(ctx, grad_new_state, grad_memory):
    _first_order_only("gated_update")
    readout, state, norm_weight, gate_weight, down, up = ctx.saved_tensors
    dr, ds, dw, dg, ddown, dup = _ops.gated_update_backward.default(
        _grad(grad_new_state, readout),
        _grad(grad_memory, readout),
        readout, state, norm_weight, gate_weight, down, up, ctx.eps, ctx.gate_snap,
    )
    return dr, _none_if_empty(ds, state is not None), dw, dg, ddown, dup, None, None


torch.library.register_autograd(
    "comet::gated_update", _gated_backward, setup_context=_gated_setup
)

# --------------------------------------------------------------------------- FIFO


def fifo_empty(
    batch: int,
    capacity: int,
    feature_shape: tuple[int, ...] | list[int],
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A new empty ring: buffer (batch, capacity, *feature_shape), head and length int64 (batch,)."""
    for name, value in (("batch", batch), ("capacity", capacity)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fifo_empty: '{name}' must be an int >= 0, got {value!r}")
    feature_shape = tuple(feature_shape)
    if any(isinstance(f, bool) or not isinstance(f, int) or f <= 0 for f in feature_shape):
        raise ValueError(f"fifo_empty: 'feature_shape' must be positive ints, got {feature_shape}")
    buffer = torch.zeros((batch, capacity, *feature_shape), dtype=dtype, device=device)
    head = torch.zeros(batch, dtype=torch.long, device=device)
    length = torch.zeros(batch, dtype=torch.long, device=device)
    return buffer, head, length


def fifo_push(buffer: Tensor, head: Tensor, length: Tensor, rows: Tensor, counts: Tensor) -> None:
    """In place: append ``rows[b, :counts[b]]`` to sample b's ring, evicting its oldest rows.

    Touches only the new rows' slots (O(new rows), not O(capacity)). Args:
    buffer (B, C, *F); head, length int64 (B,) updated in place; rows (B, n, *F);
    counts int (B,) with ``0 <= counts[b] <= n``. Not differentiable: under
    autograd use :func:`fifo_push_functional`.
    """
    if torch.is_grad_enabled() and (buffer.requires_grad or rows.requires_grad):
        raise ValueError(
            "fifo_push: updates 'buffer' in place and is not differentiable, but 'buffer' or "
            "'rows' requires grad; use fifo_push_functional (returns new tensors) for training, "
            "or call under torch.no_grad()"
        )
    _reverse_mode_only("fifo_push", buffer, rows)
    # its ADInplaceOrView kernel (csrc/autograd.cpp) bumps the versions of buffer, head and length,
    # as torch's own in-place ops do (CometMemory trusts its host copy of the FIFO lengths only
    # while their version stands still)
    _ops.fifo_push.default(buffer, head, length, rows, counts)


def fifo_push_functional(
    buffer: Tensor, head: Tensor, length: Tensor, rows: Tensor, counts: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Like :func:`fifo_push` but returns (buffer, head, length) copies; differentiable
    with respect to buffer and rows (costs O(capacity) for the copy)."""
    _reverse_mode_only("fifo_push_functional", buffer, rows)
    return _ops.fifo_push_functional.default(buffer, head, length, rows, counts)


def fifo_view(
    buffer: Tensor,
    head: Tensor,
    length: Tensor,
    cos: Optional[Tensor] = None,
    sin: Optional[Tensor] = None,
) -> Tensor:
    """The ring's rows oldest-first: (B, C, *F), zeros past ``length[b]``.

    With ``cos`` / ``sin`` tables of shape (>= C, D) and a (B, C, H, D) buffer
    (e.g. the cached pre-RoPE keys), row i gets HF rotate-half RoPE with table
    row i, computed in float32 (float64 for a float64 buffer, tables included).
    Differentiable with respect to buffer; the tables are constants.
    """
    _reverse_mode_only("fifo_view", buffer)
    return _ops.fifo_view.default(buffer, head, length, cos, sin)


@torch.library.register_fake("comet::fifo_push")
def _(buffer, head, length, rows, counts):
    _same_device("fifo_push", "buffer", buffer, head=head, length=length, rows=rows, counts=counts)
    _check_push_args("fifo_push", buffer, head, length, rows, counts)
    _check_dense_rows("fifo_push", buffer, "buffer")
    _check_dense_rows("fifo_push", rows, "rows")
    _check_inplace_push("fifo_push", buffer, head, length, rows, counts)
    return None


@torch.library.register_fake("comet::fifo_push_functional")
def _(buffer, head, length, rows, counts):
    _same_device("fifo_push_functional", "buffer", buffer, head=head, length=length, rows=rows, counts=counts)
    _check_push_args("fifo_push_functional", buffer, head, length, rows, counts)
    _check_dense_rows("fifo_push_functional", rows, "rows")
    return buffer.new_empty(buffer.shape), head.new_empty(head.shape), length.new_empty(length.shape)


@torch.library.register_fake("comet::fifo_push_backward")
def _(grad_buffer_out, head, length, counts, num_rows):
    _same_device("fifo_push_backward", "grad_buffer_out", grad_buffer_out, head=head, length=length, counts=counts)
    _check_push_backward_args("fifo_push_backward", grad_buffer_out, head, length, counts, num_rows)
    rows_shape = (grad_buffer_out.shape[0], num_rows, *grad_buffer_out.shape[2:])
    return grad_buffer_out.new_empty(grad_buffer_out.shape), grad_buffer_out.new_empty(rows_shape)


@torch.library.register_fake("comet::fifo_view")
def _(buffer, head, length, cos=None, sin=None):
    _same_device("fifo_view", "buffer", buffer, head=head, length=length, cos=cos, sin=sin)
    _check_view_args("fifo_view", buffer, "buffer", head, length, cos, sin)
    return buffer.new_empty(buffer.shape)


@torch.library.register_fake("comet::fifo_view_backward")
def _(grad_view, head, length, cos=None, sin=None):
    _same_device("fifo_view_backward", "grad_view", grad_view, head=head, length=length, cos=cos, sin=sin)
    _check_view_args("fifo_view_backward", grad_view, "grad_view", head, length, cos, sin)
    return grad_view.new_empty(grad_view.shape)


def _push_setup(ctx, inputs, output):
    buffer, head, length, rows, counts = inputs
    ctx.save_for_backward(head, length, counts)
    ctx.num_rows = rows.shape[1]


def _push_backward(ctx, grad_buffer, grad_head, grad_length):
    _first_order_only("fifo_push_functional")
    head, length, counts = ctx.saved_tensors
    if grad_buffer is None:
        return None, None, None, None, None
    gb, gr = _ops.fifo_push_backward.default(
        grad_buffer.contiguous(), head, length, counts, ctx.num_rows
    )
    return gb, None, None, gr, None


torch.library.register_autograd(
    "comet::fifo_push_functional", _push_backward, setup_context=_push_setup
)


def _view_setup(ctx, inputs, output):
    buffer, head, length, cos, sin = inputs
    ctx.save_for_backward(head, length, cos, sin)


def _view_backward(ctx, grad_view):
    _first_order_only("fifo_view")
    head, length, cos, sin = ctx.saved_tensors
    if any(ctx.needs_input_grad[3:]):
        raise NotImplementedError(
            "fifo_view: gradients with respect to the RoPE tables 'cos' / 'sin' are not "
            "supported; pass tables that do not require grad (e.g. .detach())"
        )
    grad = _ops.fifo_view_backward.default(grad_view.contiguous(), head, length, cos, sin)
    return grad, None, None, None, None


torch.library.register_autograd("comet::fifo_view", _view_backward, setup_context=_view_setup)

# --------------------------------------------------------------------------- autocast
#
# Under torch.autocast the inputs of one op arrive in mixed dtypes (an HF RMSNorm with an fp32
# weight promotes q to fp32 while v stays bf16), which the kernels reject. As torch does for its
# own ops: attention runs in autocast's lower precision (like scaled_dot_product_attention), the
# memory modules in fp32 (like layer_norm / rms_norm: the global state goes through thousands of
# gated updates). The FIFO ops are left alone: fifo_push writes into a buffer in place, and its
# rows must simply match that buffer (the model makes them so).

_autocast_lib = torch.library.Library("comet", "IMPL")


def _register_autocast(name: str, lower_precision: bool) -> None:
    op = getattr(_ops, name).default
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        def kernel(*args, _device_type=device_type):
            dtype = torch.get_autocast_dtype(_device_type) if lower_precision else torch.float32
            args = [a.to(dtype) if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != torch.float64
                    and a.device.type == _device_type else a for a in args]
            with torch.autocast(_device_type, enabled=False):
                return op(*args)

        _autocast_lib.impl(name, kernel, key)


_register_autocast("prefix_attention", lower_precision=True)
_register_autocast("rla", lower_precision=False)
_register_autocast("gated_update", lower_precision=False)

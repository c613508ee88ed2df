"""Python face of the `comet` ops: thin wrappers over ``torch.ops.comet``, their
fake (meta) kernels for torch.compile, and their autograd formulas.

Shapes: B batch, N query rows, K key rows (prefix + chunk), Hq / Hkv heads,
D head dim, M rows, d hidden, r adapter rank, C FIFO capacity.
"""
from __future__ import annotations

import math
from typing import Optional

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


@torch.library.register_fake("comet::prefix_attention")
def _(q, k, v, scale, q_lens=None, k_lens=None):
    _same_device("prefix_attention", "q", q, k=k, v=v, q_lens=q_lens, k_lens=k_lens)
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "q, k, v must be 4-D")
    torch._check(q.shape[2] > 0 and k.shape[2] > 0, lambda: "q_heads and kv_heads must be positive")
    torch._check(q.shape[2] % k.shape[2] == 0, lambda: "q_heads must be a multiple of kv_heads")
    B, N, Hq, _ = q.shape
    out = q.new_empty(q.shape)
    lse = q.new_empty((B, Hq, N), dtype=_acc_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("comet::prefix_attention_backward")
def _(grad_out, grad_lse, q, k, v, out, lse, scale, q_lens=None, k_lens=None):
    _same_device("prefix_attention_backward", "q", q, grad_out=grad_out, grad_lse=grad_lse, k=k, v=v, out=out,
                 lse=lse, q_lens=q_lens, k_lens=k_lens)
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
    torch._check(x.dim() == 2, lambda: "x must be (rows, hidden)")
    return x.new_empty(x.shape)


@torch.library.register_fake("comet::rla_backward")
def _(grad_y, x, down, up, norm_weight, eps):
    _same_device("rla_backward", "x", x, grad_y=grad_y, down=down, up=up, norm_weight=norm_weight)
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
    torch._check(readout.dim() == 3, lambda: "readout must be (batch, slots, hidden)")
    return readout.new_empty(readout.shape), readout.new_empty(readout.shape)


@torch.library.register_fake("comet::gated_update_backward")
def _(grad_new_state, grad_memory, readout, state, norm_weight, gate_weight, down, up, eps, gate_snap=1.0):
    _same_device("gated_update_backward", "readout", readout, grad_new_state=grad_new_state, grad_memory=grad_memory,
                 state=state, norm_weight=norm_weight, gate_weight=gate_weight, down=down, up=up)
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
    return None


@torch.library.register_fake("comet::fifo_push_functional")
def _(buffer, head, length, rows, counts):
    _same_device("fifo_push_functional", "buffer", buffer, head=head, length=length, rows=rows, counts=counts)
    return buffer.new_empty(buffer.shape), head.new_empty(head.shape), length.new_empty(length.shape)


@torch.library.register_fake("comet::fifo_push_backward")
def _(grad_buffer_out, head, length, counts, num_rows):
    _same_device("fifo_push_backward", "grad_buffer_out", grad_buffer_out, head=head, length=length, counts=counts)
    rows_shape = (grad_buffer_out.shape[0], num_rows, *grad_buffer_out.shape[2:])
    return grad_buffer_out.new_empty(grad_buffer_out.shape), grad_buffer_out.new_empty(rows_shape)


@torch.library.register_fake("comet::fifo_view")
def _(buffer, head, length, cos=None, sin=None):
    _same_device("fifo_view", "buffer", buffer, head=head, length=length, cos=cos, sin=sin)
    return buffer.new_empty(buffer.shape)


@torch.library.register_fake("comet::fifo_view_backward")
def _(grad_view, head, length, cos=None, sin=None):
    _same_device("fifo_view_backward", "grad_view", grad_view, head=head, length=length, cos=cos, sin=sin)
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

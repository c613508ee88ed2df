"""Malformed calls to every public function in ``comet_ext.ops``.

Each row of ``BAD_CALLS`` builds small CPU tensors, makes one malformed call
and states the exception it must raise (RuntimeError for the C++ ``TORCH_CHECK``
argument checks, ValueError for the Python-side ones) and a regex the message
must match. The regexes name the offending argument, as docs/architecture.md
("One op, one name") asks of every check ("a message that names the argument, the
expected and the actual value").

``MORE_BAD_CALLS`` holds calls that once slipped through (strided rows, or
Python-side errors that did not name the argument).

The cases that need no tensor values to be refused run again on fake and meta
tensors: the fake kernels, which torch.compile / torch.export trace through,
must refuse them the same way.

The last tests document how NaN inputs of ``prefix_attention`` propagate.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses.fake_tensor import FakeTensorMode

import comet_ext  # noqa: F401  (loads the op library)
from comet_ext import ops
from comet_ext import reference as ref

NAN = float("nan")
B, N, K, HQ, HKV, D = 2, 4, 6, 4, 2, 8  # attention shapes: K = 2 prefix + 4 chunk rows
M, HID, R = 5, 8, 2  # rla / gated_update: rows, hidden, rank
C, F = 4, 3  # FIFO capacity and row features


def _seed() -> None:
    torch.manual_seed(0)


# --------------------------------------------------------------------------- builders


def _qkv(q_shape=(B, N, HQ, D), k_shape=(B, K, HKV, D), v_shape=None, dtype=torch.float32):
    _seed()
    v_shape = k_shape if v_shape is None else v_shape
    return (
        torch.randn(q_shape, dtype=dtype),
        torch.randn(k_shape, dtype=dtype),
        torch.randn(v_shape, dtype=dtype),
    )


def _attn(q_shape=(B, N, HQ, D), k_shape=(B, K, HKV, D), v_shape=None, **kwargs):
    """A prefix_attention call with the given shapes (all float32) and keyword args."""

    def call():
        q, k, v = _qkv(q_shape, k_shape, v_shape)
        # length tensors are built with the table: they follow q to the device a test runs on (meta)
        lens = {name: t.to(q.device) for name, t in kwargs.items() if isinstance(t, torch.Tensor)}
        return ops.prefix_attention(q, k, v, **{**kwargs, **lens})

    return call


def _attn_with(mutate):
    """A prefix_attention call on well-formed q, k, v after ``mutate(q, k, v) -> (q, k, v, kwargs)``."""

    def call():
        q, k, v, kwargs = mutate(*_qkv())
        return ops.prefix_attention(q, k, v, **kwargs)

    return call


def _lens(*values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype)


def _rla_args(d=HID, r=R, dtype=torch.float32):
    _seed()
    x = torch.randn(M, d, dtype=dtype)
    down = torch.randn(r, d, dtype=dtype)
    up = torch.randn(d, r, dtype=dtype)
    w = torch.rand(d, dtype=dtype) + 0.5
    return x, down, up, w


def _rla_with(mutate):
    """An rla call after ``mutate(x, down, up, norm_weight) -> (args, kwargs)``."""

    def call():
        args, kwargs = mutate(*_rla_args())
        return ops.rla(*args, **kwargs)

    return call


def _gated_args(dtype=torch.float32):
    _seed()
    readout = torch.randn(B, 3, HID, dtype=dtype)
    state = torch.randn(B, 3, HID, dtype=dtype)
    norm_weight = torch.rand(HID, dtype=dtype) + 0.5
    gate_weight = torch.randn(1, 2 * HID, dtype=dtype)
    down = torch.randn(R, HID, dtype=dtype)
    up = torch.randn(HID, R, dtype=dtype)
    return dict(
        readout=readout, state=state, norm_weight=norm_weight, gate_weight=gate_weight,
        down=down, up=up,
    )


def _gated_with(**overrides):
    """A gated_update call with some arguments replaced by ``overrides[name](args)``."""

    def call():
        args = _gated_args()
        for name, make in overrides.items():
            args[name] = make(args)
        return ops.gated_update(**args)

    return call


def _fifo_state(features=(F,), dtype=torch.float32, n=2):
    """A FIFO with one row in sample 0 and three (wrapped) in sample 1, plus n rows to push."""
    _seed()
    buffer = torch.randn(B, C, *features, dtype=dtype)
    head = _lens(0, 3)
    length = _lens(1, 3)
    rows = torch.randn(B, n, *features, dtype=dtype)
    counts = _lens(2, 1)
    return dict(buffer=buffer, head=head, length=length, rows=rows, counts=counts)


def _push_with(fn=None, **overrides):
    """A fifo_push (or fifo_push_functional) call with some arguments replaced."""
    fn = ops.fifo_push if fn is None else fn

    def call():
        args = _fifo_state()
        for name, make in overrides.items():
            args[name] = make(args)
        return fn(**args)

    return call


def _view_with(features=(2, D), **overrides):
    """A fifo_view call on a (B, C, *features) ring with some arguments replaced / added."""

    def call():
        st = _fifo_state(features)
        args = dict(buffer=st["buffer"], head=st["head"], length=st["length"])
        for name, make in overrides.items():
            args[name] = make(args)
        return ops.fifo_view(**args)

    return call


def _rope_tables(rows=C, dim=D):
    pos = torch.arange(rows, dtype=torch.float32)[:, None]
    freqs = pos * torch.rand(dim)[None, :]
    return freqs.cos(), freqs.sin()


# --------------------------------------------------------------------------- the table

BAD_CALLS = [
    # ---- prefix_attention: rank, dtype, batch, heads, shapes
    pytest.param(_attn(q_shape=(B, N, HQ * D)), RuntimeError, r"'q' must be 4-D .*got shape \(2, 4, 32\)",
                 id="attention-q-rank-3"),
    pytest.param(_attn(k_shape=(B, K, HKV, D, 1)), RuntimeError, r"'k' must be 4-D",
                 id="attention-k-rank-5"),
    pytest.param(_attn(v_shape=(B, K, HKV * D)), RuntimeError, r"'v' must be 4-D",
                 id="attention-v-rank-3"),
    pytest.param(_attn_with(lambda q, k, v: (q, k.double(), v.double(), {})), RuntimeError,
                 r"'k' has dtype Double but 'q' has dtype Float", id="attention-k-dtype-mismatch"),
    pytest.param(_attn_with(lambda q, k, v: (q, k, v.bfloat16(), {})), RuntimeError,
                 r"'v' has dtype BFloat16 but 'q' has dtype Float", id="attention-v-dtype-mismatch"),
    pytest.param(_attn(k_shape=(B + 1, K, HKV, D)), RuntimeError,
                 r"'k' must have batch = 2 in dim 0, got shape \(3, 6, 2, 8\)", id="attention-batch-mismatch"),
    pytest.param(_attn(q_shape=(B, N, 3, D)), RuntimeError,
                 r"q_heads \(3\) must be a multiple of kv_heads \(2\)", id="attention-gqa-heads-not-multiple"),
    pytest.param(_attn(k_shape=(B, K, 0, D)), RuntimeError,
                 r"q_heads and kv_heads must be positive", id="attention-zero-kv-heads"),
    pytest.param(_attn(k_shape=(B, K, HKV, D // 2)), RuntimeError,
                 r"'k' must have head_dim \(as q\) = 8 in dim 3", id="attention-head-dim-q-vs-k"),
    pytest.param(_attn(v_shape=(B, K - 1, HKV, D)), RuntimeError,
                 r"'k' and 'v' must have the same shape, got \(2, 6, 2, 8\) and \(2, 5, 2, 8\)",
                 id="attention-k-v-shape-mismatch"),
    pytest.param(_attn(v_shape=(B, K, HKV, D + 2)), RuntimeError,
                 r"'k' and 'v' must have the same shape", id="attention-v-head-dim-mismatch"),
    pytest.param(_attn_with(lambda q, k, v: (q.long(), k.long(), v.long(), {"scale": 0.5})), RuntimeError,
                 r"'q' must be float32, bfloat16, float16 or float64, got Long", id="attention-integer-q"),
    pytest.param(_attn(q_shape=(B, N, HQ, 0), k_shape=(B, K, HKV, 0), scale=1.0), RuntimeError,
                 r"head_dim must be positive, got q of shape \(2, 4, 4, 0\)", id="attention-zero-head-dim"),
    # ---- prefix_attention: strides and scale
    pytest.param(_attn_with(lambda q, k, v: (torch.randn(B, N, HQ, 2 * D)[..., ::2], k, v, {})), RuntimeError,
                 r"'q' must have unit stride in its last dimension", id="attention-q-last-dim-strided"),
    pytest.param(_attn_with(lambda q, k, v: (q, k, torch.randn(B, K, HKV, 2 * D)[..., ::2], {})), RuntimeError,
                 r"'v' must have unit stride in its last dimension", id="attention-v-last-dim-strided"),
    pytest.param(_attn(scale=NAN), RuntimeError, r"'scale' must be finite, got nan", id="attention-nan-scale"),
    pytest.param(_attn(scale=math.inf), RuntimeError, r"'scale' must be finite, got inf", id="attention-inf-scale"),
    # ---- prefix_attention: length tensors
    pytest.param(_attn(q_lens=_lens(4, -1)), RuntimeError,
                 r"'q_lens'\[1\] = -1 is out of range: it must lie in \[0, 4\]", id="attention-q_lens-negative"),
    pytest.param(_attn(q_lens=_lens(N + 1, 2)), RuntimeError,
                 r"'q_lens'\[0\] = 5 is out of range.*\[0, 4\]", id="attention-q_lens-above-queries"),
    pytest.param(_attn(k_lens=_lens(K, K + 1)), RuntimeError,
                 r"'k_lens'\[1\] = 7 is out of range.*\[0, 6\]", id="attention-k_lens-above-keys"),
    pytest.param(_attn(k_lens=_lens(-3, K, dtype=torch.int32)), RuntimeError,
                 r"'k_lens'\[0\] = -3 is out of range", id="attention-k_lens-negative-int32"),
    pytest.param(_attn(q_lens=_lens(4.0, 2.0, dtype=torch.float32)), RuntimeError,
                 r"'q_lens' must be int64 or int32, got Float", id="attention-q_lens-float"),
    pytest.param(_attn(k_lens=_lens(K, K).view(B, 1)), RuntimeError,
                 r"'k_lens' must have shape \(2,\) \(one length per sample\), got \(2, 1\)",
                 id="attention-k_lens-2d"),
    pytest.param(_attn(q_lens=_lens(4, 4, 4)), RuntimeError,
                 r"'q_lens' must have shape \(2,\).*got \(3\)", id="attention-q_lens-wrong-batch"),
    # ---- rla
    pytest.param(_rla_with(lambda x, down, up, w: ((torch.tensor(1.0), down, up), {})), ValueError,
                 r"rla: 'x' must have a hidden dimension, got a 0-D tensor", id="rla-x-0d"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down.flatten(), up), {})), RuntimeError,
                 r"'down' must be 2-D", id="rla-down-rank-1"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down[:, :-1], up), {})), RuntimeError,
                 r"'down' must have shape \(rank, 8\) for hidden size 8 of 'x', got \(2, 7\)",
                 id="rla-down-hidden-mismatch"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up[:, :1]), {})), RuntimeError,
                 r"'up' must have shape \(8, 2\), got \(8, 1\)", id="rla-up-rank-mismatch"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up.t().contiguous()), {})), RuntimeError,
                 r"'up' must have shape \(8, 2\), got \(2, 8\)", id="rla-up-transposed"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down[:0], up[:, :0]), {})), RuntimeError,
                 r"'down' must have a positive rank", id="rla-zero-rank"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up, w[:-1]), {})), RuntimeError,
                 r"'norm_weight' must have shape \(8,\), got \(7\)", id="rla-norm_weight-shape"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up, w[None]), {})), RuntimeError,
                 r"'norm_weight' must have shape \(8,\), got \(1, 8\)", id="rla-norm_weight-2d"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up.double()), {})), RuntimeError,
                 r"'up' has dtype Double but 'x' has dtype Float", id="rla-up-dtype-mismatch"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up, w.half()), {})), RuntimeError,
                 r"'norm_weight' has dtype Half but 'x' has dtype Float", id="rla-norm_weight-dtype-mismatch"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x.int(), down.int(), up.int()), {})), RuntimeError,
                 r"'x' must be float32, bfloat16, float16 or float64, got Int", id="rla-integer-x"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up, w), {"eps": NAN})), RuntimeError,
                 r"'eps' must be finite and >= 0, got nan", id="rla-nan-eps"),
    pytest.param(_rla_with(lambda x, down, up, w: ((x, down, up, w), {"eps": -1e-6})), RuntimeError,
                 r"'eps' must be finite and >= 0", id="rla-negative-eps"),
    # ---- gated_update
    pytest.param(_gated_with(readout=lambda a: a["readout"][0]), RuntimeError,
                 r"'readout' must be 3-D \(batch, slots, hidden\), got shape \(3, 8\)", id="gated-readout-rank-2"),
    pytest.param(_gated_with(readout=lambda a: a["readout"].long(), state=lambda a: None,
                             eps=lambda a: 1e-6), RuntimeError,
                 r"'readout' must be float32, bfloat16, float16 or float64, got Long", id="gated-integer-readout"),
    pytest.param(_gated_with(gate_weight=lambda a: a["gate_weight"][:, :HID]), RuntimeError,
                 r"'gate_weight' must have shape \(1, 16\).*got \(1, 8\)", id="gated-gate_weight-half-width"),
    pytest.param(_gated_with(gate_weight=lambda a: a["gate_weight"].flatten()), RuntimeError,
                 r"'gate_weight' must have shape \(1, 16\).*got \(16\)", id="gated-gate_weight-1d"),
    pytest.param(_gated_with(gate_weight=lambda a: a["gate_weight"].view(2, HID)), RuntimeError,
                 r"'gate_weight' must have shape \(1, 16\).*got \(2, 8\)", id="gated-gate_weight-2-rows"),
    pytest.param(_gated_with(gate_weight=lambda a: a["gate_weight"].double()), RuntimeError,
                 r"'gate_weight' has dtype Double but 'readout' has dtype Float", id="gated-gate_weight-dtype"),
    pytest.param(_gated_with(state=lambda a: a["state"][:, :2]), RuntimeError,
                 r"'state' must have the shape of readout \(2, 3, 8\), got \(2, 2, 8\)", id="gated-state-slots-mismatch"),
    pytest.param(_gated_with(state=lambda a: a["state"][:1]), RuntimeError,
                 r"'state' must have the shape of readout \(2, 3, 8\), got \(1, 3, 8\)", id="gated-state-batch-mismatch"),
    pytest.param(_gated_with(state=lambda a: a["state"].bfloat16()), RuntimeError,
                 r"'state' has dtype BFloat16 but 'readout' has dtype Float", id="gated-state-dtype"),
    pytest.param(_gated_with(norm_weight=lambda a: a["norm_weight"][:-2]), RuntimeError,
                 r"'norm_weight' must have shape \(8,\), got \(6\)", id="gated-norm_weight-shape"),
    pytest.param(_gated_with(down=lambda a: torch.randn(R, HID + 1)), RuntimeError,
                 r"'down' must have shape \(rank, 8\) for hidden size 8 of 'readout'", id="gated-down-hidden-mismatch"),
    pytest.param(_gated_with(up=lambda a: torch.randn(HID, R + 1)), RuntimeError,
                 r"'up' must have shape \(8, 2\), got \(8, 3\)", id="gated-up-rank-mismatch"),
    pytest.param(_gated_with(eps=lambda a: NAN), RuntimeError,
                 r"'eps' must be finite and >= 0, got nan", id="gated-nan-eps"),
    pytest.param(_gated_with(gate_snap=lambda a: 0.0), RuntimeError,
                 r"'gate_snap' must be in \(0, 1\] \(1 = gates are never snapped\), got 0", id="gated-zero-snap"),
    pytest.param(_gated_with(gate_snap=lambda a: 1.5), RuntimeError,
                 r"'gate_snap' must be in \(0, 1\].*got 1\.5", id="gated-snap-above-1"),
    pytest.param(_gated_with(gate_snap=lambda a: NAN), RuntimeError,
                 r"'gate_snap' must be in \(0, 1\].*got nan", id="gated-nan-snap"),
    # ---- fifo_empty
    pytest.param(lambda: ops.fifo_empty(B, -1, (F,)), ValueError,
                 r"fifo_empty: 'capacity' must be an int >= 0, got -1", id="fifo_empty-negative-capacity"),
    pytest.param(lambda: ops.fifo_empty(-2, C, (F,)), ValueError,
                 r"'batch' must be an int >= 0, got -2", id="fifo_empty-negative-batch"),
    pytest.param(lambda: ops.fifo_empty(B, 2.5, (F,)), ValueError,
                 r"'capacity' must be an int >= 0, got 2\.5", id="fifo_empty-float-capacity"),
    pytest.param(lambda: ops.fifo_empty(B, C, (F, 0)), ValueError,
                 r"'feature_shape' must be positive ints, got \(3, 0\)", id="fifo_empty-zero-feature"),
    # ---- fifo_push
    pytest.param(_push_with(buffer=lambda a: a["buffer"].requires_grad_()), ValueError,
                 r"fifo_push: .*'buffer' or 'rows' requires grad.*fifo_push_functional",
                 id="fifo_push-buffer-requires-grad"),
    pytest.param(_push_with(rows=lambda a: a["rows"].requires_grad_()), ValueError,
                 r"'buffer' or 'rows' requires grad", id="fifo_push-rows-requires-grad"),
    pytest.param(_push_with(buffer=lambda a: a["buffer"][0, 0]), RuntimeError,
                 r"'buffer' must be \(batch, capacity, \*features\), got shape \(3\)", id="fifo_push-buffer-rank-1"),
    pytest.param(_push_with(rows=lambda a: torch.randn(B, 2, F + 2)), RuntimeError,
                 r"'rows' must have shape \(2, n, \[3\]\) to match buffer \(2, 4, 3\), got \(2, 2, 5\)",
                 id="fifo_push-rows-feature-mismatch"),
    pytest.param(_push_with(rows=lambda a: a["rows"][..., None]), RuntimeError,
                 r"'rows' must have shape \(2, n, \[3\]\).*got \(2, 2, 3, 1\)", id="fifo_push-rows-rank-mismatch"),
    pytest.param(_push_with(rows=lambda a: a["rows"][:1]), RuntimeError,
                 r"'rows' must have shape .*got \(1, 2, 3\)", id="fifo_push-rows-batch-mismatch"),
    pytest.param(_push_with(rows=lambda a: a["rows"].double()), RuntimeError,
                 r"'rows' has dtype Double but 'buffer' has dtype Float", id="fifo_push-rows-dtype"),
    pytest.param(_push_with(rows=lambda a: torch.randn(B, 2, 2 * F)[..., ::2]), RuntimeError,
                 r"'rows' must be contiguous in its feature dimensions", id="fifo_push-rows-last-dim-strided"),
    pytest.param(_push_with(buffer=lambda a: torch.randn(B, C, 2 * F)[..., ::2]), RuntimeError,
                 r"'buffer' must be contiguous in its feature dimensions", id="fifo_push-buffer-last-dim-strided"),
    pytest.param(_push_with(counts=lambda a: _lens(-1, 0)), RuntimeError,
                 r"'counts'\[0\] = -1 must lie in \[0, 2\]", id="fifo_push-counts-negative"),
    pytest.param(_push_with(counts=lambda a: _lens(0, 3)), RuntimeError,
                 r"'counts'\[1\] = 3 must lie in \[0, 2\]", id="fifo_push-counts-above-rows"),
    pytest.param(_push_with(counts=lambda a: _lens(1.0, 1.0, dtype=torch.float32)), RuntimeError,
                 r"'counts' must be int64 or int32, got Float", id="fifo_push-counts-float"),
    pytest.param(_push_with(counts=lambda a: _lens(1)), RuntimeError,
                 r"'counts' must have shape \(2,\).*got \(1\)", id="fifo_push-counts-wrong-batch"),
    pytest.param(_push_with(head=lambda a: _lens(0, C)), RuntimeError,
                 r"'head'\[1\] = 4 must lie in \[0, 4\)", id="fifo_push-head-equals-capacity"),
    pytest.param(_push_with(head=lambda a: _lens(-1, 0)), RuntimeError,
                 r"'head'\[0\] = -1 must lie in \[0, 4\)", id="fifo_push-head-negative"),
    pytest.param(_push_with(length=lambda a: _lens(C + 1, 0)), RuntimeError,
                 r"'length'\[0\] = 5 must lie in \[0, 4\]", id="fifo_push-length-above-capacity"),
    pytest.param(_push_with(length=lambda a: _lens(0, -2)), RuntimeError,
                 r"'length'\[1\] = -2 must lie in \[0, 4\]", id="fifo_push-length-negative"),
    pytest.param(_push_with(head=lambda a: a["head"].int()), RuntimeError,
                 r"'head' must be int64, got Int", id="fifo_push-head-int32"),
    pytest.param(_push_with(length=lambda a: a["length"].float()), RuntimeError,
                 r"'length' must be int64, got Float", id="fifo_push-length-float"),
    pytest.param(_push_with(length=lambda a: a["length"][:, None]), RuntimeError,
                 r"'length' must have shape \(2,\) \(one per sample\), got \(2, 1\)", id="fifo_push-length-2d"),
    pytest.param(_push_with(length=lambda a: torch.zeros(2 * B, dtype=torch.long)[::2]), RuntimeError,
                 r"'head' and 'length' must be contiguous", id="fifo_push-length-not-contiguous"),
    # ---- fifo_push_functional (same checks, its own op name)
    pytest.param(_push_with(ops.fifo_push_functional, rows=lambda a: torch.randn(B, 2, F - 1)), RuntimeError,
                 r"comet::fifo_push_functional: 'rows' must have shape \(2, n, \[3\]\)",
                 id="fifo_push_functional-rows-feature-mismatch"),
    pytest.param(_push_with(ops.fifo_push_functional, counts=lambda a: _lens(2, 9)), RuntimeError,
                 r"comet::fifo_push_functional: 'counts'\[1\] = 9 must lie in \[0, 2\]",
                 id="fifo_push_functional-counts-above-rows"),
    pytest.param(_push_with(ops.fifo_push_functional, head=lambda a: _lens(7, 0)), RuntimeError,
                 r"'head'\[0\] = 7 must lie in \[0, 4\)", id="fifo_push_functional-head-out-of-range"),
    # ---- fifo_view
    pytest.param(_view_with(cos=lambda a: _rope_tables()[0]), RuntimeError,
                 r"'cos' and 'sin' must be given together", id="fifo_view-cos-without-sin"),
    pytest.param(_view_with(sin=lambda a: _rope_tables()[1]), RuntimeError,
                 r"'cos' and 'sin' must be given together", id="fifo_view-sin-without-cos"),
    pytest.param(_view_with(features=(2, 5), cos=lambda a: _rope_tables(dim=5)[0],
                            sin=lambda a: _rope_tables(dim=5)[1]), RuntimeError,
                 r"RoPE needs an even head_dim, got 5", id="fifo_view-rope-odd-head-dim"),
    pytest.param(_view_with(features=(2 * D,), cos=lambda a: _rope_tables()[0],
                            sin=lambda a: _rope_tables()[1]), RuntimeError,
                 r"with RoPE 'buffer' must be \(batch, capacity, heads, head_dim\), got shape \(2, 4, 16\)",
                 id="fifo_view-rope-buffer-rank-3"),
    pytest.param(_view_with(cos=lambda a: _rope_tables(rows=C - 1)[0],
                            sin=lambda a: _rope_tables(rows=C - 1)[1]), RuntimeError,
                 r"'cos' must have shape \(>= 4, 8\) \(a row per FIFO slot\), got \(3, 8\)",
                 id="fifo_view-rope-table-too-short"),
    pytest.param(_view_with(cos=lambda a: _rope_tables()[0],
                            sin=lambda a: _rope_tables(dim=D // 2)[1]), RuntimeError,
                 r"'sin' must have shape \(>= 4, 8\).*got \(4, 4\)", id="fifo_view-rope-sin-head-dim"),
    pytest.param(_view_with(cos=lambda a: _rope_tables()[0].long(),
                            sin=lambda a: _rope_tables()[1]), RuntimeError,
                 r"'cos' must be float32, bfloat16, float16 or float64, got Long", id="fifo_view-rope-integer-cos"),
    pytest.param(_view_with(buffer=lambda a: a["buffer"].long()), RuntimeError,
                 r"'buffer' must be float32, bfloat16, float16 or float64, got Long", id="fifo_view-integer-buffer"),
    pytest.param(_view_with(length=lambda a: _lens(0, C + 1)), RuntimeError,
                 r"'length'\[1\] = 5 must lie in \[0, 4\]", id="fifo_view-length-above-capacity"),
    pytest.param(_view_with(length=lambda a: _lens(-1, 0)), RuntimeError,
                 r"'length'\[0\] = -1 must lie in", id="fifo_view-length-negative"),
    pytest.param(_view_with(head=lambda a: _lens(C, 0)), RuntimeError,
                 r"'head'\[0\] = 4 must lie in \[0, 4\)", id="fifo_view-head-equals-capacity"),
    pytest.param(_view_with(head=lambda a: a["head"].int()), RuntimeError,
                 r"'head' must be int64, got Int", id="fifo_view-head-int32"),
    pytest.param(_view_with(head=lambda a: _lens(0, 0, 0)), RuntimeError,
                 r"'head' must have shape \(2,\) \(one per sample\), got \(3\)", id="fifo_view-head-wrong-batch"),
]


@pytest.mark.parametrize("call, exc, pattern", BAD_CALLS)
def test_bad_call_is_rejected_with_a_message_naming_the_argument(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_table_is_large_and_ids_are_unique():
    ids = [p.id for p in BAD_CALLS]
    assert len(ids) >= 24
    assert len(set(ids)) == len(ids)


# --------------------------------------------------------------------------- known gaps


def _strided_last(shape):
    """A float32 tensor of ``shape`` whose last dimension has stride 2."""
    _seed()
    return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]


MORE_BAD_CALLS = [
    # rla and gated_update read rows as contiguous blocks: a strided last dim is refused.

    pytest.param(lambda: ops.rla(_strided_last((M, HID)), *_rla_args()[1:3]), RuntimeError,
                 r"'x' must have unit stride in its last dimension", id="rla-x-last-dim-strided"),
    pytest.param(lambda: ops.rla(_strided_last((2, 3, HID)), *_rla_args()[1:3]), RuntimeError,
                 r"'x' must have unit stride in its last dimension", id="rla-x3d-last-dim-strided"),
    pytest.param(_gated_with(readout=lambda a: _strided_last((B, 3, HID))), RuntimeError,
                 r"'readout' must have unit stride in its last dimension", id="gated-readout-last-dim-strided"),
    pytest.param(_gated_with(state=lambda a: _strided_last((B, 3, HID))), RuntimeError,
                 r"'state' must have unit stride in its last dimension", id="gated-state-last-dim-strided"),
    # Malformed inputs that the Python face must hand to the op's checks untouched.
    pytest.param(_attn(q_shape=(B, N, HQ, 0), k_shape=(B, K, HKV, 0)), RuntimeError,
                 r"head_dim must be positive", id="attention-zero-head-dim-default-scale"),
    pytest.param(lambda: ops.prefix_attention(torch.tensor(1.0), *_qkv()[1:]), RuntimeError,
                 r"'q' must be 4-D", id="attention-q-0d"),
    pytest.param(_gated_with(readout=lambda a: a["readout"].long(), state=lambda a: None), RuntimeError,
                 r"'readout' must be float32", id="gated-integer-readout-default-eps"),
    pytest.param(lambda: ops.rla(torch.randn(M, 0), torch.randn(R, 0), torch.randn(0, R)), RuntimeError,
                 r"'x' must have a positive hidden size", id="rla-zero-hidden"),
    pytest.param(lambda: ops.rla(torch.randn(2, 3, 0), torch.randn(R, 0), torch.randn(0, R)), RuntimeError,
                 r"'x' must have a positive hidden size", id="rla-3d-zero-hidden"),
    pytest.param(lambda: ops.rla(torch.randn(0), torch.randn(R, 0), torch.randn(0, R)), RuntimeError,
                 r"'x' must have a positive hidden size", id="rla-1d-zero-hidden"),
]


@pytest.mark.parametrize("call, exc, pattern", MORE_BAD_CALLS)
def test_more_bad_calls_are_rejected(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def _meta(t: torch.Tensor) -> torch.Tensor:
    return t.to("meta")


def _fifo():
    return torch.zeros(2, 4, 3), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long)


ONE_META_TENSOR = [  # (the dispatcher runs the fake kernels then, which returned uninitialised real tensors)
    pytest.param(lambda: ops.prefix_attention(_qkv()[0], _meta(_qkv()[1]), _qkv()[2]), "'k' is on meta but 'q'",
                 id="attention-k"),
    pytest.param(lambda: ops.prefix_attention(*_qkv(), q_lens=_meta(torch.tensor([1, 2]))), "'q_lens' is on meta",
                 id="attention-q-lens"),
    pytest.param(lambda: ops.rla(torch.randn(3, 8), _meta(torch.randn(2, 8)), torch.randn(8, 2)), "'down' is on meta",
                 id="rla-down"),
    pytest.param(lambda: torch.ops.comet.rla(torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2),
                                             _meta(torch.ones(8)), 1e-6), "'norm_weight' is on meta", id="rla-direct"),
    pytest.param(lambda: ops.gated_update(torch.randn(1, 2, 8), _meta(torch.randn(1, 2, 8)), torch.ones(8),
                                          torch.randn(1, 16), torch.randn(2, 8), torch.randn(8, 2)),
                 "'state' is on meta", id="gated-state"),
    pytest.param(lambda: ops.fifo_push(*_fifo(), torch.ones(2, 2, 3), _meta(torch.tensor([2, 2]))),
                 "'counts' is on meta", id="push-counts"),
    pytest.param(lambda: ops.fifo_push_functional(*_fifo(), _meta(torch.ones(2, 2, 3)), torch.tensor([2, 2])),
                 "'rows' is on meta", id="push-functional-rows"),
    pytest.param(lambda: ops.fifo_view(_fifo()[0], _meta(_fifo()[1]), _fifo()[2]), "'head' is on meta",
                 id="view-head"),
]


def _push_sharing(what: str):
    """A fifo_push call whose arguments share memory (``what``), its tensors built when it runs."""

    def call():
        buffer, head, length = torch.arange(8.0).view(1, 8, 1), torch.tensor([0]), torch.tensor([3])
        rows, counts = torch.ones(1, 2, 1), torch.tensor([2])
        if what == "rows-in-buffer":  # a ring's own rows pushed back into it
            rows = buffer[:, :2]
        elif what == "head-is-length":
            length = head
        elif what == "expanded-buffer":  # every slot of a sample one memory location
            buffer = torch.zeros(1, 1, 1).expand(1, 8, 1)
        return ops.fifo_push(buffer, head, length, rows, counts)

    return call


PUSH_SHARING = [
    ("rows-in-buffer", "'buffer' and 'rows' share memory"), ("head-is-length", "'head' and 'length' share memory"),
    ("expanded-buffer", "'buffer' has elements that share memory")]


@pytest.mark.parametrize("what, pattern", PUSH_SHARING)
def test_an_in_place_push_refuses_arguments_that_share_memory(what, pattern):
    """The push writes buffer, head and length in place: sharing memory with another argument (or
    within itself) wrote what was still to be read, silently."""
    with pytest.raises(RuntimeError, match=pattern):
        _push_sharing(what)()


def test_forward_mode_ad_is_refused_not_silently_zero():
    """The ops' derivatives are reverse mode: torch.func.jvp / forward_ad dropped the tangents
    (a zero or missing tangent, no word). Refused; tensors without a tangent still run under an
    open dual level."""
    import torch.autograd.forward_ad as fwAD

    x, down, up = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(NotImplementedError, match="rla: forward-mode AD"):
        torch.func.jvp(lambda x: ops.rla(x, down, up), (x,), (torch.ones_like(x),))
    q, k, v = _qkv()
    buffer, head, length = torch.randn(2, 4, 3), torch.tensor([0, 1]), torch.tensor([2, 3])
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="prefix_attention: forward-mode AD"):
            ops.prefix_attention(q, fwAD.make_dual(k, torch.ones_like(k)), v)
        with pytest.raises(NotImplementedError, match="fifo_view: forward-mode AD"):
            ops.fifo_view(fwAD.make_dual(buffer, torch.ones_like(buffer)), head, length)
        with pytest.raises(NotImplementedError, match="gated_update: forward-mode AD"):
            s = torch.randn(1, 2, 8)
            ops.gated_update(torch.randn(1, 2, 8), fwAD.make_dual(s, torch.ones_like(s)), torch.ones(8),
                             torch.randn(1, 16), torch.randn(2, 8), torch.randn(8, 2))
        torch.testing.assert_close(ops.rla(x, down, up), ref.rla(x, down, up))  # no tangent: runs


@pytest.mark.parametrize("call, pattern", ONE_META_TENSOR)
def test_one_meta_tensor_among_real_ones_is_refused_by_name(call, pattern):
    with pytest.raises(RuntimeError, match=pattern + ".*must be on the same device"):
        call()


# --------------------------------------------------------------------------- the same refusals while tracing

# Refused by the kernels for the values inside head / length / counts / q_lens / k_lens: a fake or meta
# tensor has a shape but no values, so only the kernels can check these (the CPU ones do, the CUDA ones clamp).
NEEDS_VALUES = {
    "attention-q_lens-negative", "attention-q_lens-above-queries", "attention-k_lens-above-keys",
    "attention-k_lens-negative-int32", "fifo_push-counts-negative", "fifo_push-counts-above-rows",
    "fifo_push-head-equals-capacity", "fifo_push-head-negative", "fifo_push-length-above-capacity",
    "fifo_push-length-negative", "fifo_push_functional-counts-above-rows", "fifo_push_functional-head-out-of-range",
    "fifo_view-length-above-capacity", "fifo_view-length-negative", "fifo_view-head-equals-capacity",
}
TRACEABLE_BAD_CALLS = [p for p in BAD_CALLS + MORE_BAD_CALLS if p.id not in NEEDS_VALUES] + [
    pytest.param(_push_sharing(what), RuntimeError, pattern, id=f"fifo_push-{what}") for what, pattern in PUSH_SHARING
]


def test_the_cases_left_to_the_kernels_are_in_the_tables():
    assert NEEDS_VALUES <= {p.id for p in BAD_CALLS + MORE_BAD_CALLS}


@pytest.mark.parametrize("tensors", ["fake", "meta"])
@pytest.mark.parametrize("call, exc, pattern", TRACEABLE_BAD_CALLS)
def test_fake_kernels_refuse_what_the_kernels_refuse(tensors, call, exc, pattern):
    """Every malformed call of the tables above, its tensors made fake (FakeTensorMode, as torch.compile /
    torch.export trace) or on the meta device, is refused with the kernel's exception and message: the fake
    kernels accepted shapes the kernels refuse, traced made-up output shapes and left the error to run
    time. The in-place push's memory-sharing cases are in too (fake and meta tensors keep the real ones'
    aliasing). Left out: the cases in NEEDS_VALUES, refused for the values inside head / length / counts /
    q_lens / k_lens, which a fake tensor does not have. The ValueError cases, the Python face's own checks,
    run before any kernel; they stay in, as they too must hold under tracing."""
    # (a real tensor built with the table, a length, is made fake as torch.compile makes its inputs fake)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if tensors == "fake" else torch.device("meta")
    with pytest.raises(exc, match=pattern):
        with mode:
            call()


@pytest.mark.parametrize("dynamic", [False, True])
def test_compile_refuses_mismatched_rla_weights_while_tracing(dynamic):
    """torch.compile(fullgraph=True) of an rla call with an up of the wrong rank stops in the fake
    kernel, naming the argument: no graph reaches the backend and the kernel never runs."""
    torch._dynamo.reset()
    backend = CompileCounterWithBackend("aot_eager")
    x, down, up, w = _rla_args()
    f = torch.compile(lambda x, down, up, w: ops.rla(x, down, up, w), fullgraph=True, backend=backend,
                      dynamic=dynamic)
    try:
        with pytest.raises(RuntimeError, match=r"comet::rla: 'up' must have shape \(8, 2\), got \(8, 3\)"):
            f(x, down, torch.randn(HID, R + 1), w)
        assert backend.frame_count == 0
        torch.testing.assert_close(f(x, down, up, w), ref.rla(x, down, up, w))  # well-formed: traces and runs
    finally:
        torch._dynamo.reset()


# --------------------------------------------------------------------------- NaN behaviour


def _nan_inputs():
    _seed()
    q = torch.randn(1, N, HQ, D)
    k = torch.randn(1, K, HKV, D)
    v = torch.randn(1, K, HKV, D)
    return q, k, v


def test_nan_in_q_poisons_only_that_query_row():
    """A NaN in one (query row, head) of q makes that row's out and lse NaN; every other
    row is finite and equals the reference on the clean inputs (no row sees another's q)."""
    q, k, v = _nan_inputs()
    bad_q = q.clone()
    bad_q[0, 2, 1, 3] = NAN
    out, lse = ops.prefix_attention(bad_q, k, v)
    ref_out, ref_lse = ref.prefix_attention(q, k, v)

    poisoned = torch.zeros(1, N, HQ, dtype=torch.bool)
    poisoned[0, 2, 1] = True
    assert out[poisoned].isnan().all()
    assert lse.transpose(1, 2)[poisoned].isnan().all()
    assert torch.isfinite(out[~poisoned]).all()
    assert torch.isfinite(lse.transpose(1, 2)[~poisoned]).all()
    torch.testing.assert_close(out[~poisoned], ref_out[~poisoned], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.transpose(1, 2)[~poisoned], ref_lse.transpose(1, 2)[~poisoned],
                               atol=2e-5, rtol=2e-5)
    # The reference agrees on where the NaN lands.
    bad_ref_out, _ = ref.prefix_attention(bad_q, k, v)
    assert torch.equal(out.isnan(), bad_ref_out.isnan())


@pytest.mark.parametrize("how", ["-inf in q", "q.k overflows"])
def test_a_row_whose_visible_scores_are_all_minus_inf_is_nan_not_padding(how):
    """Only -inf scores (a -inf in q, or a finite q.k that overflows) leave a row that sees keys
    with nothing to normalise: NaN, as the oracle's softmax gives and as docs/ops.md says of a
    non-finite query row. It came back as out 0 / lse -inf, a padded row's result."""
    q, k, v = _nan_inputs()
    bad_q = q.clone()
    if how == "-inf in q":
        k = k.abs() + 0.1  # every score of the row then -inf
        bad_q[0, 2, 1] = 0.0
        bad_q[0, 2, 1, 3] = -math.inf
    else:
        k = torch.full_like(k, 1e20)
        bad_q[0, 2, 1] = -1e20
    out, lse = ops.prefix_attention(bad_q, k, v)
    ref_out, ref_lse = ref.prefix_attention(bad_q, k, v)
    assert out[0, 2, 1].isnan().all() and lse[0, 1, 2].isnan()
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(lse.isnan(), ref_lse.isnan())


def test_nan_in_last_key_poisons_only_the_rows_that_see_it():
    """Bottom-right causal: the last key is visible only to the last query row, so a NaN
    there poisons that row (all heads of its kv group; here Hkv head 0 -> q heads 0, 1)."""
    q, k, v = _nan_inputs()
    bad_k = k.clone()
    bad_k[0, K - 1, 0, 5] = NAN
    out, lse = ops.prefix_attention(q, bad_k, v)
    ref_out, _ = ref.prefix_attention(q, k, v)

    poisoned = torch.zeros(1, N, HQ, dtype=torch.bool)
    poisoned[0, N - 1, : HQ // HKV] = True
    assert out[poisoned].isnan().all()
    assert lse.transpose(1, 2)[poisoned].isnan().all()
    assert torch.isfinite(out[~poisoned]).all()
    torch.testing.assert_close(out[~poisoned], ref_out[~poisoned], atol=2e-5, rtol=2e-5)


def test_nan_in_padded_keys_is_ignored():
    """Keys past k_lens are never read: NaN there leaves every output finite."""
    q, k, v = _nan_inputs()
    k_lens = _lens(K - 1)
    bad_k, bad_v = k.clone(), v.clone()
    bad_k[0, K - 1] = NAN
    bad_v[0, K - 1] = NAN
    out, lse = ops.prefix_attention(q, bad_k, bad_v, k_lens=k_lens)
    ref_out, _ = ref.prefix_attention(q, k, v, k_lens=k_lens)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)


def test_nan_in_a_late_value_stays_out_of_earlier_query_tiles():
    """Documented behaviour: a non-finite value may reach rows of its own 64-row query tile
    (0 * NaN in the tile product, as in FlashAttention) but never rows of earlier tiles,
    which do not read it."""
    _seed()
    n = 130
    q, k, v = torch.randn(1, n, 2, 8), torch.randn(1, n, 1, 8), torch.randn(1, n, 1, 8)
    v[0, n - 1, 0, 3] = NAN  # the last key: seen only by the last query row
    out, _ = ops.prefix_attention(q, k, v)
    assert out[0, n - 1, :, 3].isnan().all()  # the NaN feature of the value it sees
    assert torch.isfinite(out[0, :128]).all()


def test_backward_through_empty_inputs_gives_empty_gradients():
    """`.sum()` hands backward an expanded gradient; an empty one stays strided under
    .contiguous(), which the kernels' stride checks refused."""
    q = torch.randn(B, 0, HQ, D, requires_grad=True)
    k, v = (torch.randn(B, K, HKV, D, requires_grad=True) for _ in range(2))
    ops.prefix_attention(q, k, v)[0].sum().backward()
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()
    x = torch.randn(0, HID, requires_grad=True)
    down, up = torch.randn(R, HID, requires_grad=True), torch.randn(HID, R, requires_grad=True)
    ops.rla(x, down, up).sum().backward()
    assert x.grad.shape == (0, HID) and not down.grad.any() and not up.grad.any()
    readout = torch.randn(0, 3, HID, requires_grad=True)
    new_state, memory = ops.gated_update(readout, None, torch.ones(HID), torch.zeros(1, 2 * HID), down, up)
    (new_state.sum() + memory.sum()).backward()
    assert readout.grad.shape == readout.shape


def test_double_backward_is_refused_not_silently_wrong():
    """The backward kernels have no derivative of their own: a second-order gradient through
    them would treat them as constants (zeros where the reference has values)."""
    x = torch.randn(M, HID, dtype=torch.float64, requires_grad=True)
    down, up = torch.randn(R, HID, dtype=torch.float64), torch.randn(HID, R, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="comet::rla: double backward"):
        torch.autograd.grad(ops.rla(x, down, up).pow(2).sum(), x, create_graph=True)
    q = torch.randn(B, N, HQ, D, requires_grad=True)
    k = torch.randn(B, K, HKV, D)
    with pytest.raises(NotImplementedError, match="comet::prefix_attention: double backward"):
        torch.autograd.grad(ops.prefix_attention(q, k, k)[0].pow(2).sum(), q, create_graph=True)
    (g,) = torch.autograd.grad(ops.rla(x, down, up).pow(2).sum(), x)  # first order: fine
    (expected,) = torch.autograd.grad(ref.rla(x, down, up).pow(2).sum(), x)
    torch.testing.assert_close(g, expected)

"""One layer's CoMeT memory over a few chunks, built from the four comet ops.

Stands in for the model (which arrives with the HF integration): random
"layer outputs" play the role of the readout and compression rows, and each
chunk attends over [global memory ; FIFO ; chunk] exactly as a CoMeT layer
does (docs/model.md), with ragged per-sample lengths. Every step is checked
against comet_ext.reference, and the attention is timed against torch SDPA.

    python examples/ops_demo.py
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import comet_ext
from comet_ext import ops
from comet_ext import reference as ref


def main() -> None:
    torch.manual_seed(0)
    B, d, heads, kv_heads, head_dim, rank = 2, 256, 4, 2, 64, 8
    chunk, num_global, stride, budget = 256, 64, 8, 96
    print(f"comet_ext {comet_ext.__version__}, build: {comet_ext.build_info()}")
    print(f"batch {B}, hidden {d}, chunk {chunk}, {num_global} global slots, FIFO of {budget}, stride {stride}")

    # Per-layer memory modules (random init stands in for trained weights).
    g_norm = torch.ones(d)
    gate = torch.randn(1, 2 * d) * 0.02
    g_down, g_up = torch.randn(rank, d) * d**-0.5, torch.zeros(d, rank)
    t_norm, t_down, t_up = torch.ones(d), torch.randn(rank, d) * d**-0.5, torch.randn(d, rank) * 0.01
    k_proj = torch.randn(d, kv_heads * head_dim) * d**-0.5

    state = None
    fifo = ops.fifo_empty(B, budget, (kv_heads, head_dim))  # pre-RoPE keys of compressed rows
    fifo_ref = tuple(t.clone() for t in fifo)
    lengths = [[256, 256, 256, 100], [256, 256, 173, 0]]  # ragged: sample 1 ends early
    for t, chunk_lens in enumerate(zip(*lengths)):
        n_text = torch.tensor(chunk_lens)
        n_comp = (n_text + stride - 1) // stride  # closed chunk: one per (partial) group

        # Keys of this chunk's rows: [global ; FIFO ; text], packed per sample.
        global_k = torch.zeros(B, num_global if state is not None else 0, kv_heads, head_dim)
        if state is not None:
            global_k = (memory @ k_proj).view(B, num_global, kv_heads, head_dim)  # noqa: F821
        fifo_k = ops.fifo_view(*fifo)
        text_k = torch.randn(B, chunk, kv_heads, head_dim)
        q = torch.randn(B, chunk, heads, head_dim)
        keys, k_lens = [], []
        for b in range(B):
            parts = [global_k[b], fifo_k[b, : int(fifo[2][b])], text_k[b, : int(n_text[b])]]
            row = torch.cat(parts)
            k_lens.append(row.shape[0])
            keys.append(F.pad(row, (0, 0, 0, 0, 0, num_global + budget + chunk - row.shape[0])))
        k = torch.stack(keys)
        k_lens = torch.tensor(k_lens)
        out, lse = ops.prefix_attention(q, k, k, q_lens=n_text, k_lens=k_lens)
        out_ref, _ = ref.prefix_attention(q, k, k, q_lens=n_text, k_lens=k_lens)
        err_attn = (out - out_ref).abs().max().item()

        # The layer's outputs at the compression rows -> FIFO; at the readout rows -> global memory.
        comp = torch.randn(B, int(n_comp.max()), d)
        m = ops.rla(comp, t_down, t_up, t_norm)
        m_keys = (m @ k_proj).view(B, -1, kv_heads, head_dim)
        ops.fifo_push(*fifo, m_keys, n_comp)
        ref.fifo_push(*fifo_ref, m_keys, n_comp)
        readout = torch.randn(B, num_global, d)
        new_state, memory = ops.gated_update(readout, state, g_norm, gate, g_down, g_up)
        exp_state, exp_memory = ref.gated_update(readout, state, g_norm, gate, g_down, g_up)
        err_mem = max((new_state - exp_state).abs().max().item(), (memory - exp_memory).abs().max().item())
        state = new_state
        same_fifo = torch.equal(ops.fifo_view(*fifo), ref.fifo_view(*fifo_ref))
        print(f"chunk {t}: text {n_text.tolist()}, keys {k_lens.tolist()}, FIFO rows {fifo[2].tolist()}; "
              f"max |ours - reference|: attention {err_attn:.1e}, memory {err_mem:.1e}, FIFO equal {same_fifo}")
        assert err_attn < 1e-4 and err_mem < 1e-4 and same_fifo

    # Attention at the reference shapes, scaled to this machine, against torch SDPA.
    N, P = 2816, 2560
    q = torch.randn(1, N, 8, 128)
    k, v = torch.randn(1, P + N, 2, 128), torch.randn(1, P + N, 2, 128)
    mask = causal_lower_right(N, P + N)

    def best(fn):
        fn()
        times = []
        for _ in range(3):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best(lambda: ops.prefix_attention(q, k, v))
    sdpa = best(lambda: F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, enable_gqa=True))
    print(f"prefix_attention, {N} queries over {P} prefix + {N} chunk keys, 8/2 heads, dim 128: "
          f"{sdpa / ours:.2f}x the speed of torch SDPA (same run)")


if __name__ == "__main__":
    main()

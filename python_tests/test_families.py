"""What a base model may be: its family, its head, and the positions CoMeT runs it over
(sliding windows and length-dependent RoPE are refused where the chunk's rows would pass them)."""
from __future__ import annotations

import pytest
import torch
from modeling_utils import naive_forward, tiny_base
from transformers import LlamaConfig, LlamaForSequenceClassification, LlamaModel, MixtralConfig, MixtralForCausalLM

from comet_ext.config import CometConfig
from comet_ext.modeling import CometForCausalLM
from comet_ext.segments import max_chunk_rows

CFG = CometConfig(chunk_size=16, num_global=4, temp_stride=4, temp_budget=6, rla_rank=2)
ROWS = max_chunk_rows(CFG)  # 2 x 4 global + 6 FIFO + 16 text + 4 compression = 34


def test_max_chunk_rows_counts_a_closed_chunk_with_full_memories():
    assert ROWS == 34
    assert max_chunk_rows(CometConfig(temp_stride=-1)) == 2 * 512 + 2048
    assert max_chunk_rows(CometConfig()) == 2 * 512 + 2048 + 2048 + 256  # the reference defaults: 5376


def _one_chunk_equals_base(base, x):
    """Accepted, and one chunk of text before its first compression token is the base model."""
    model = CometForCausalLM.from_base(base, CFG).eval()
    x = x[:, :CFG.temp_stride]
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, base(x).logits, rtol=1e-5, atol=1e-5)
    return model


@pytest.mark.parametrize("family, window", [("mistral", {"sliding_window": 8}),
                                            ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}),
                                            ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
                                                       "max_window_layers": 1})])
def test_a_sliding_window_shorter_than_a_chunk_is_refused(family, window):
    """CoMeT's attention has no window: over a chunk longer than the model's window it attended
    past it, silently (one chunk of 16 tokens with an 8-key window: logits 0.3-0.5 off the base's)."""
    with pytest.raises(ValueError, match=rf"sliding window \(8 keys\) is shorter than the {ROWS} rows"):
        CometForCausalLM.from_base(tiny_base(family, **window), CFG)
    window["sliding_window"] = ROWS  # no row of a chunk is ever out of the window: exactly the base model
    x = torch.randint(0, 97, (1, 16), generator=torch.Generator().manual_seed(0))
    model = _one_chunk_equals_base(tiny_base(family, **window), x)
    with pytest.raises(ValueError, match=r"comet_config: the model's sliding window"):  # sizes changed later
        model.comet_config = CometConfig(**{**CFG.to_dict(), "chunk_size": 17})


HD = 16  # the tiny models' head dim


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("rope", [{"rope_type": "dynamic", "factor": 4.0, "rope_theta": 10000.0},
                                  {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * (HD // 2),
                                   "long_factor": [8.0] * (HD // 2), "original_max_position_embeddings": ROWS}])
def test_a_rope_scaled_by_length_is_refused_past_its_switch_and_exact_below(family, rope):
    """Dynamic NTK and longrope pick frequencies by the length of each forward; CoMeT's memory rows
    and chunk rows take their tables in separate calls, which got different frequencies (logits up
    to 0.3 off the reference-structure oracle). Refused where a chunk passes the switch; below
    it the tables are the base's, and the fast forward equals the oracle."""
    with pytest.raises(ValueError, match=rf"RoPE \('{rope['rope_type']}'\) changes its frequencies .* past "
                                         rf"{ROWS - 1} positions, and a CoMeT chunk runs over {ROWS}"):
        limit = {"original_max_position_embeddings": ROWS - 1} if rope["rope_type"] == "longrope" else {}
        CometForCausalLM.from_base(tiny_base(family, rope_parameters={**rope, **limit},
                                             max_position_embeddings=ROWS - 1), CFG)
    base = tiny_base(family, rope_parameters=rope, max_position_embeddings=ROWS)
    x = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    model = _one_chunk_equals_base(base, x[:, :16])
    with torch.no_grad():
        base(torch.randint(0, 97, (1, 3 * ROWS)))  # a long plain forward first (dynamic keeps its scaling)
        expected = naive_forward(model, x, model._chunk_sizes(None, 45))
        torch.testing.assert_close(model(x).logits, expected, rtol=1e-5, atol=1e-5)


def test_models_that_are_not_supported_causal_lms_are_refused_by_name():
    mixtral = MixtralForCausalLM(MixtralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=2))
    with pytest.raises(ValueError, match="does not support model_type 'mixtral'"):
        CometForCausalLM.from_base(mixtral, CFG)
    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    for headless in (LlamaModel(config), LlamaForSequenceClassification(config)):
        with pytest.raises(ValueError, match=rf"expected a causal LM .*got {type(headless).__name__}"):
            CometForCausalLM.from_base(headless, CFG)

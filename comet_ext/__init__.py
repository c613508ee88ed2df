"""comet_ext: the CoMeT memory (gated global memory + FIFO of compressed tokens)
for Hugging Face decoder LMs, as PyTorch C++/CUDA ops.

    import comet_ext
    out, lse = comet_ext.ops.prefix_attention(q, k, v)
    model = comet_ext.CometForCausalLM.from_base("path/to/llama", comet_ext.CometConfig())
    memory = model.read(long_input_ids)
    answer = model.generate(question_ids, memory=memory, max_new_tokens=32)
"""
from ._extension import build_info, load as _load

_load()

from . import ops  # noqa: E402  (ops need the loaded library)
from .attention import register  # noqa: E402
from .config import CometConfig  # noqa: E402
from .memory import CometMemory  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "register", "CometConfig", "CometMemory", "CometForCausalLM", "__version__"]


def __getattr__(name):
    # The model needs transformers; import it only when asked for.
    if name == "CometForCausalLM":
        from .modeling import CometForCausalLM

        return CometForCausalLM
    raise AttributeError(f"module 'comet_ext' has no attribute {name!r}")

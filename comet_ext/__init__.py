"""comet_ext: the CoMeT memory (gated global memory + FIFO of compressed tokens)
for Hugging Face decoder LMs, as PyTorch C++/CUDA ops.

    import comet_ext
    out, lse = comet_ext.ops.prefix_attention(q, k, v)
"""
from ._extension import build_info, load as _load

_load()

from . import ops  # noqa: E402  (ops need the loaded library)

__version__ = "0.1.0"
__all__ = ["ops", "build_info", "__version__"]

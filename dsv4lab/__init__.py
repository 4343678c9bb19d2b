"""dsv4lab: a research workbench for DeepSeek-V4 layers, their fused kernels, and five vLLM refactors."""
import os as _os

import torch as _torch

# Without a GPU, Triton kernels run under the interpreter. The choice must precede every ``@triton.jit``
# decorator -- including the ones torch._dynamo imports -- so it is made when dsv4lab is first imported.
if not _torch.cuda.is_available():
    _os.environ.setdefault("TRITON_INTERPRET", "1")
from .config import DSv4Config, get_config, PRESETS

__version__ = "0.1.0"
__all__ = ["DSv4Config", "get_config", "PRESETS", "__version__"]

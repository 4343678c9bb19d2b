"""dsv4lab: a research workbench for DeepSeek-V4 layers, their fused kernels, and five vLLM refactors."""
from .config import DSv4Config, get_config, PRESETS

__version__ = "0.1.0"
__all__ = ["DSv4Config", "get_config", "PRESETS", "__version__"]

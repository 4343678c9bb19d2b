"""DSv4 layers as nn.Modules (weights frozen, deterministic random init), each taking a registry backend.

``MHC`` / ``HCHead`` (mHC), ``DSv4Attention``, ``MoE``, ``DecoderLayer`` (vLLM or unfused wiring),
``MTP`` and a small end-to-end ``Model``.
"""
from .attention import DSv4Attention
from .decoder import DecoderLayer
from .mhc import MHC, HCHead
from .model import Model
from .moe import MoE
from .mtp import MTP

__all__ = ["DSv4Attention", "DecoderLayer", "HCHead", "MHC", "MTP", "Model", "MoE"]

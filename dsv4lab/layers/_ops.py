"""Op lookup for the layer modules: the requested backend where the op has one, else the reference.

A model built with ``backend="tilelang"`` runs the TileLang mHC kernels and the reference for every op that has
no TileLang implementation; each module records what it resolved in ``op_backends`` (op -> backend) so the
mix is visible (``Model.op_backends()``). Where ``registry.PREFERENCE`` ranks the op's fused backends and the
request is one of them, the first one available here runs instead (``registry.pick``: sparse_attention asked for
triton or tilelang runs TileLang on Hopper with tilelang installed, Triton elsewhere). Otherwise a backend that
exists for an op but cannot run here raises ``registry.BackendUnavailable`` with the reason.
"""
from __future__ import annotations

from typing import Any, Callable

from ..kernels import registry


def resolve(op: str, backend: str) -> tuple[str, Callable[..., Any]]:
    """``(backend actually used, implementation)`` of ``op`` for the requested ``backend``."""
    if backend not in registry.BACKENDS:
        raise ValueError(f"backend: expected one of {registry.BACKENDS}, got {backend!r}")
    name = registry.pick(op, backend)[0] if backend in registry.backends(op) else "reference"
    return name, registry.get(op, name)


class OpTable:
    """Resolved ops of one module: ``table[op]`` is the callable, ``table.backends`` maps op -> backend."""

    def __init__(self, backend: str, *ops: str) -> None:
        self.backends: dict[str, str] = {}
        self._fns: dict[str, Callable[..., Any]] = {}
        for op in ops:
            self.backends[op], self._fns[op] = resolve(op, backend)

    def __getitem__(self, op: str) -> Callable[..., Any]:
        return self._fns[op]

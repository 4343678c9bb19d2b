"""registry.PREFERENCE / registry.pick: which backend the layer modules run for an op with ranked fused backends.

Availability is faked with monkeypatch (TileLang needs a Hopper GPU), so the choice is checked on the CPU; the real
choice on a GPU is checked by tests/test_sparse_attention.py::test_dsv4_attention_triton_backend and the Hopper-only
test below.
"""
from __future__ import annotations

import pytest
import torch

from dsv4lab import get_config
from dsv4lab.kernels import registry
from dsv4lab.layers import _ops


def fake_availability(monkeypatch, can_run: set[str]):
    """registry.availability says ``sparse_attention`` backends in ``can_run`` (and every other op's) can run."""
    real = registry.availability

    def fake(op, name):
        if op != "sparse_attention":
            return real(op, name)
        return (True, "") if name in can_run else (False, f"faked: {name} cannot run")

    monkeypatch.setattr(registry, "availability", fake)


def test_sparse_attention_prefers_tilelang_then_triton():
    assert registry.PREFERENCE["sparse_attention"] == ("tilelang", "triton")
    assert set(registry.PREFERENCE["sparse_attention"]) <= set(registry.backends("sparse_attention"))


@pytest.mark.parametrize("can_run, requested, expect", [
    ({"tilelang", "triton", "reference", "torch"}, "triton", "tilelang"),
    ({"tilelang", "triton", "reference", "torch"}, "tilelang", "tilelang"),
    ({"triton", "reference", "torch"}, "triton", "triton"),        # CPU / no Hopper: unchanged
    ({"triton", "reference", "torch"}, "tilelang", "triton"),
    ({"reference", "torch"}, "tilelang", "tilelang"),              # nothing ranked runs: get() raises with the reason
    ({"tilelang", "triton", "reference", "torch"}, "reference", "reference"),   # the oracle stays the oracle
    ({"tilelang", "triton", "reference", "torch"}, "torch", "torch"),           # unranked backends: as asked
])
def test_pick(monkeypatch, can_run, requested, expect):
    fake_availability(monkeypatch, can_run)
    name, why = registry.pick("sparse_attention", requested)
    assert name == expect
    assert ("preferred" in why) == (name != requested)


def test_unranked_op_is_never_redirected(monkeypatch):
    assert "compressor" not in registry.PREFERENCE
    assert registry.pick("compressor", "triton") == ("triton", "requested")


def test_layer_resolution_follows_the_preference(monkeypatch):
    """DSv4Attention's op table: sparse_attention runs TileLang when it can, Triton when not; the other cores and a
    reference request are untouched."""
    from dsv4lab.layers.attention import DSv4Attention
    from dsv4lab.kernels.tilelang.sparse_attention import sparse_attention_with_sink as tl_attention
    from dsv4lab.kernels.triton.sparse_attention import sparse_attention_with_sink as tri_attention

    cfg = get_config("toy")
    fake_availability(monkeypatch, {"tilelang", "triton", "reference", "torch"})
    name, fn = _ops.resolve("sparse_attention", "triton")
    assert (name, fn) == ("tilelang", tl_attention)
    mod = DSv4Attention(cfg, 1, backend="triton")
    assert mod.op_backends == {"sparse_attention": "tilelang", "compressor": "triton", "indexer_topk": "reference"}
    assert mod._ops["sparse_attention"] is tl_attention
    assert DSv4Attention(cfg, 1).op_backends["sparse_attention"] == "reference"

    fake_availability(monkeypatch, {"triton", "reference", "torch"})
    mod = DSv4Attention(cfg, 1, backend="triton")
    assert mod.op_backends["sparse_attention"] == "triton" and mod._ops["sparse_attention"] is tri_attention
    # asked for TileLang where it cannot run: the next ranked backend, not an error
    assert DSv4Attention(cfg, 1, backend="tilelang").op_backends["sparse_attention"] == "triton"


def test_matrix_reports_the_preference(monkeypatch):
    fake_availability(monkeypatch, {"triton", "reference", "torch"})
    rows = {r["backend"]: r for r in registry.matrix() if r["op"] == "sparse_attention"}
    assert {b: r["preference"] for b, r in rows.items()} == {"reference": "", "torch": "", "triton": 2, "tilelang": 1}
    assert rows["tilelang"]["available"] is False and "faked" in rows["tilelang"]["reason"]
    assert all(r["preference"] == "" for r in registry.matrix() if r["op"] not in registry.PREFERENCE)


def test_cpu_choice_is_triton():
    """No GPU here: the layers' sparse_attention stays on Triton (the interpreter), as before the preference."""
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    assert not registry.availability("sparse_attention", "tilelang")[0]
    assert registry.pick("sparse_attention", "triton") == ("triton", "requested")


def _on_hopper_with_tilelang() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) \
        and registry.capability("tilelang")[0]


@pytest.mark.skipif(not _on_hopper_with_tilelang(), reason="needs an sm_90 GPU and tilelang")
def test_hopper_prefill_runs_tilelang_ws():
    from dsv4lab.kernels.tilelang import sparse_attention as TLSA

    assert registry.pick("sparse_attention", "triton")[0] == "tilelang"
    assert TLSA.resolve_design(512) == {"design": "ws", "block_n": 64, "stages": 2, "trim": True}

"""Parameter counts from the tensor table reproduce the published model sizes (dsv4-layers.md 1.1, 1.3)."""
import pytest

from dsv4lab import get_config, sizing


def test_flash_totals_match_published():
    s = sizing.model_summary(get_config("flash"), include_mtp=False)
    assert s["total_params"] == pytest.approx(284e9, rel=0.005)        # "284 B"
    assert 12.5e9 < s["active_params"] < 14e9                           # "13 B" active


def test_pro_totals_match_published():
    s = sizing.model_summary(get_config("pro"), include_mtp=False)
    assert s["total_params"] == pytest.approx(1.6e12, rel=0.02)         # "1.6 T" (rounded)
    assert s["active_params"] == pytest.approx(49e9, rel=0.03)          # "49 B" active


def test_per_layer_counts_match_the_table():
    flash = {t.name: t.params for t in sizing.layer_params(get_config("flash"), 2)}  # a CSA layer
    assert flash["attn.wq_b.weight"] == 64 * 512 * 1024                  # 33.6 M
    assert flash["attn.wo_a.weight"] == 8 * 1024 * (64 * 512 // 8)      # 33.6 M
    assert sum(v for k, v in flash.items() if k.startswith("ffn.experts")) == 256 * 3 * 2048 * 4096  # 6442 M
    hca = {t.name for t in sizing.layer_params(get_config("flash"), 3)}
    assert "attn.compressor.ape" in hca and not any("indexer" in n for n in hca)
    window = {t.name for t in sizing.layer_params(get_config("flash"), 0)}
    assert not any("compressor" in n for n in window) and "ffn.gate.tid2eid" in window


def test_checkpoint_header_shapes():
    # Observed Flash shard headers (dsv4-layers.md 1.3): wo_a fp8 [8192, 4096] + scale [64, 32]; expert w1 [2048, 2048] + [2048, 128]
    t = {x.name: x for x in sizing.layer_params(get_config("flash"), 0)}
    assert t["attn.wo_a.weight"].shape == (8192, 4096) and t["attn.wo_a.scale"].shape == (64, 32)
    assert t["attn.wq_a.scale"].shape == (8, 32)
    assert t["ffn.experts.*.w1.weight"].shape[1:] == (2048, 2048) and t["ffn.experts.*.w1.scale"].shape[1:] == (2048, 128)

"""DSv4Config: presets carry the released values, from_hf_config round-trips, invalid combos name the field."""
import json

import pytest

from dsv4lab.config import DSv4Config, PRESETS, get_config

# Published values (dsv4-layers.md 1.1), written out independently of config.py.
FLASH_JSON = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
    "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
    "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
    "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "rope_theta": 10000,
    "compress_rope_theta": 160000,
    "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                     "beta_fast": 32, "beta_slow": 1},
    "max_position_embeddings": 1048576, "index_n_heads": 64, "index_head_dim": 128, "index_topk": 512,
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "n_routed_experts": 256,
    "n_shared_experts": 1, "num_experts_per_tok": 6, "moe_intermediate_size": 2048,
    "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
    "routed_scaling_factor": 1.5, "num_hash_layers": 3, "first_k_dense_replace": 0, "swiglu_limit": 10.0,
    "hidden_act": "silu", "num_nextn_predict_layers": 1, "expert_dtype": "fp4", "tie_word_embeddings": False,
    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "torch_dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1,
}


def test_flash_fixture_file_matches_preset(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(FLASH_JSON))
    from_file = DSv4Config.from_hf_config(tmp_path)
    flash = get_config("flash")
    for f in ("hidden_size", "compress_ratios", "index_topk", "n_routed_experts", "routed_scaling_factor",
              "rope_scaling", "quantization_config", "num_hash_layers", "swiglu_limit", "o_groups"):
        assert getattr(from_file, f) == getattr(flash, f), f


def test_flash_schedule_counts():
    c = get_config("flash")
    ratios = [c.compress_ratio(i) for i in range(c.num_hidden_layers)]
    assert ratios.count(0) == 2 and ratios.count(4) == 21 and ratios.count(128) == 20
    assert c.compress_ratio(c.num_hidden_layers) == 0  # MTP layer is window-only
    assert [c.is_hash_layer(i) for i in range(4)] == [True, True, True, False]
    assert c.rope_base(0) == 10000 and c.rope_base(2) == 160000


def test_pro_values():
    c = get_config("pro")
    ratios = [c.compress_ratio(i) for i in range(c.num_hidden_layers)]
    assert ratios.count(128) == 31 and ratios.count(4) == 30
    assert (c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.o_groups, c.heads_per_group) == (7168, 128, 1536, 16, 8)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.routed_scaling_factor, c.index_topk) == (384, 3072, 2.5, 1024)


def test_toy_keeps_block_sizes():
    c = get_config("toy")
    assert c.compress_ratios == (0, 4, 128, 4, 0)
    assert c.nope_head_dim % 64 == 0 and c.hidden_size % 128 == 0 and c.moe_intermediate_size % 128 == 0
    assert c.nope_head_dim % 128 == 128 - c.qk_rope_head_dim  # vLLM output-quant assert
    assert c.hc_mix_dim == 24


def test_roundtrip_through_hf_dict():
    for name in PRESETS:
        c = get_config(name)
        back = DSv4Config.from_hf_config(c.to_hf_dict(), name=name)
        assert back == c


@pytest.mark.parametrize("field,value", [
    ("o_groups", 3),                 # 64 heads not divisible by 3
    ("compress_ratios", (0,) * 43 + (7,)),
    ("qk_rope_head_dim", 1024),      # larger than head_dim
    ("num_experts_per_tok", 1000),
    ("hidden_size", 0),
    ("num_key_value_heads", 2),
    ("scoring_func", "softmax"),
    ("compress_ratios", (0, 4)),     # wrong length
])
def test_invalid_configs_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("flash", **{field: value})


def test_bad_preset_and_bad_source():
    with pytest.raises(ValueError, match="preset"):
        get_config("huge")
    with pytest.raises(TypeError, match="path_or_dict"):
        DSv4Config.from_hf_config(42)
    with pytest.raises(ValueError, match="model_type"):
        DSv4Config.from_hf_config({"model_type": "llama"})
    with pytest.raises(ValueError, match="config.json"):
        DSv4Config.from_hf_config("/nonexistent/dir")


def test_replace_depth_keeps_mtp_entry():
    c = get_config("flash", num_hidden_layers=4)
    assert c.compress_ratios == (0, 0, 4, 128, 0)

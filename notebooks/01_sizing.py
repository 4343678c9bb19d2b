# %% [markdown]
# # 01 · Sizing: parameters, FLOPs, bytes and the roofline
#
# Every number here is computed from the config (`dsv4lab.config`) and the tensor table of the checkpoint
# (`dsv4lab.sizing`, dsv4-layers.md 1.3), or from the roofline formulas of `dsv4lab.lab.roofline`
# (dsv4-layers.md 7). The peaks on the roofline chart are **measured** on a GPU (`bench/peaks.py`) and read
# from `data/results/<gpu>/peaks.jsonl`, never taken from a datasheet.
#
# **Prediction.** With DSv4-Flash almost all parameters sit in the routed experts (256 x 3 x 2048 x 4096 per
# layer, stored as fp4), but a token touches 6 of 256, so the active count is ~5% of the total. The mHC and
# norm kernels have arithmetic intensity of a few FLOP/byte and must be memory-bound; GEMMs become
# compute-bound only once T is in the hundreds.

# %%
import pandas as pd

from dsv4lab import get_config, sizing
from dsv4lab.lab import roofline

rows = []
for preset in ("toy", "flash", "pro"):
    s = sizing.model_summary(get_config(preset), include_mtp=False)
    rows.append({"preset": preset, "total (B)": s["total_params"] / 1e9, "active (B)": s["active_params"] / 1e9,
                 "checkpoint GiB (incl. MTP)": sizing.model_summary(get_config(preset))["checkpoint_bytes"] / 2**30})
pd.DataFrame(rows).set_index("preset").round(3)

# %% [markdown]
# ## Parameters per group of one layer

# %%
def layer_table(preset: str = "flash", layer: int = 2) -> pd.DataFrame:
    t = pd.DataFrame([dict(name=x.name, group=x.group, shape=x.shape, dtype=x.dtype, params=x.params, bytes=x.nbytes)
                      for x in sizing.layer_params(get_config(preset), layer)])
    return t.groupby("group")[["params", "bytes"]].sum().sort_values("params", ascending=False)


layer_table("flash", 2)

# %% [markdown]
# ## FLOPs, bytes and arithmetic intensity per kernel

# %%
KERNELS = {  # op -> extra shape arguments the config does not fill
    "mhc_pre": {}, "mhc_post": {}, "mhc_fused_post_pre": {}, "hc_head": {},
    "mtp_input_rmsnorm": {}, "inv_rope_fp8_quant": {}, "fp8_einsum_wo_a": {},
    "moe_routing": {}, "moe_experts": {"n_shared": 1},
}


def kernel_table(preset: str = "flash", T: int = 4096) -> pd.DataFrame:
    cfg = get_config(preset)
    out = []
    for op, extra in KERNELS.items():
        c = roofline.cost(op, cfg=cfg, T=T, **extra)
        out.append({"op": op, "GFLOP": c.flops / 1e9, "MB": c.bytes / 1e6, "FLOP/byte": c.flops / max(c.bytes, 1)})
    for name, (n, k) in {"router_gemm": (cfg.n_routed_experts, cfg.hidden_size),
                         "wq_b fp8_gemm": (cfg.num_attention_heads * cfg.head_dim, cfg.q_lora_rank)}.items():
        c = roofline.cost("router_gemm" if name == "router_gemm" else "fp8_gemm", T=T, N=n, K=k)
        out.append({"op": name, "GFLOP": c.flops / 1e9, "MB": c.bytes / 1e6, "FLOP/byte": c.flops / max(c.bytes, 1)})
    return pd.DataFrame(out).set_index("op").round(3)


kernel_table("flash", 4096)

# %% [markdown]
# ## Roofline with measured peaks

# %%
import plotly.graph_objects as go

peaks = roofline.load_peaks("h100")
note = "measured H100 peaks" if peaks else "no stored H100 peaks yet: ridge lines omitted"


def roofline_figure(preset: str = "flash", T: int = 4096) -> go.Figure:
    tab = kernel_table(preset, T)
    fig = go.Figure(go.Scatter(x=tab["FLOP/byte"], y=tab["GFLOP"], mode="markers+text", text=tab.index,
                               textposition="top center"))
    if peaks:
        ridge = peaks.bf16_flops / peaks.copy_bw
        fig.add_vline(x=ridge, line_dash="dash", annotation_text=f"bf16 ridge {ridge:.0f} FLOP/B")
    fig.update_layout(title=f"{preset}, T={T}: arithmetic intensity per kernel ({note})",
                      xaxis_type="log", yaxis_type="log", xaxis_title="FLOP / byte", yaxis_title="GFLOP per call")
    return fig


roofline_figure("flash", 4096)

# %% [markdown]
# ## Turn the knobs

# %%
try:
    import ipywidgets as w

    w.interact(lambda preset, T: display(kernel_table(preset, T)),  # noqa: F821 (display: IPython builtin)
               preset=["toy", "flash", "pro"], T=w.SelectionSlider(options=[1, 16, 64, 256, 1024, 4096, 16384], value=4096))
except ImportError:
    print("ipywidgets not installed: pip install 'dsv4lab[lab]'")

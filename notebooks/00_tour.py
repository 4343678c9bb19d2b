# %% [markdown]
# # dsv4lab: a tour
#
# dsv4lab is a workbench for the DeepSeek-V4 (DSv4) layers and for five refactors vLLM made to its DSv4 code.
# Every layer has a plain-PyTorch **reference** (fp32 math, the oracle); fused kernels in Triton, TileLang and
# DeepGEMM are checked against it and timed with one harness. Without a GPU, references and Triton kernels
# (under Triton's interpreter) run live, and measured H100 results are read from `data/results/`.
#
# Notebooks:
# - [01_sizing](01_sizing.ipynb): parameters, FLOPs and bytes per layer and per kernel, roofline
# - [02_mhc](02_mhc.ipynb), [03_attention](03_attention.ipynb), [04_moe](04_moe.ipynb), [05_mtp](05_mtp.ipynb):
#   each layer's math, the reference step by step, the fused kernels against it
# - [10_pr41300_router_gemm](10_pr41300_router_gemm.ipynb): cuBLAS op vs `torch.mm(out_dtype=float32)`
# - [11_pr43746_mtp_norm](11_pr43746_mtp_norm.ipynb): fused Triton MTP-input RMSNorm
# - [11b_pr43746_breakable_graphs](11b_pr43746_breakable_graphs.ipynb): breakable CUDA graphs vs torch.compile
# - [12_pr43891_op_registration](12_pr43891_op_registration.ipynb): what `torch.ops` registration cost
# - [13_pr43905_mhc_direct](13_pr43905_mhc_direct.ipynb): mHC TileLang kernels called directly
# - [14_pr44367_megamoe](14_pr44367_megamoe.ipynb): grouped fp8 experts, MegaMoE, the inlined expert call
#
# ## This machine

# %%
import torch

import dsv4lab
from dsv4lab.kernels import registry
from dsv4lab.lab import results

device = "cuda" if torch.cuda.is_available() else "cpu"
prov = results.provenance()
print({k: prov[k] for k in ("gpu", "cuda", "torch", "triton", "tilelang", "deep_gemm", "commit")})

# %% [markdown]
# ## The backend matrix
# One registry maps each op to its backends. A backend that cannot run here says why (no GPU, library
# missing, interpreter off); nothing else breaks because of it.

# %%
import pandas as pd

matrix = pd.DataFrame(registry.matrix())
matrix.pivot_table(index="op", columns="backend", values="available", aggfunc="first").fillna("")

# %%
matrix.loc[~matrix.available, ["op", "backend", "reason"]]

# %% [markdown]
# ## One mHC call through every backend
# `mhc_post` mixes the four residual streams: `R'[k] = post[k] * f + sum_j comb[j, k] * R[j]`.
# Prediction: every backend that runs here agrees with the reference to within one bf16 ulp
# (the fused kernels round once, like the reference).

# %%
from dsv4lab import sweep

records = sweep.bench("mhc_post", preset="toy", tokens=[4, 64], device=device)
pd.DataFrame(records)[["op", "backend", "tokens", "metric", "value", "unit"]].query(
    "metric in ['time', 'max_abs', 'bitwise_equal', 'unavailable']")

# %% [markdown]
# Times above are `cpu-clock` on a CPU (Python + eager ops, not GPU kernel time). The refactor notebooks show
# stored H100 timings next to them.

# %% [markdown]
# ## Real weights
# Point `CHECKPOINT` (or the environment variable `DSV4LAB_CHECKPOINT`) at a DeepSeek-V4 checkpoint directory
# and pick a layer: `dsv4lab inspect` lists its tensors from the safetensors headers alone, and every op whose
# weights that layer holds runs through every backend on the real tensors (activations stay synthetic) -- the
# same as `dsv4lab compare --checkpoint DIR --layer N`. Without a checkpoint, a synthetic toy checkpoint written
# in the published format (fp8 + UE8M0 scales, packed fp4 experts) stands in.

# %%
import os
import tempfile

from dsv4lab import checkpoint, get_config

CHECKPOINT = os.environ.get("DSV4LAB_CHECKPOINT")
LAYER = 1
if CHECKPOINT is None:
    toy = get_config("toy")
    CHECKPOINT = tempfile.mkdtemp(prefix="dsv4lab-toy-checkpoint-")
    checkpoint.write_checkpoint(CHECKPOINT, toy, checkpoint.synthetic_tensors(toy, seed=0), shards=2)
    print("no checkpoint given: a synthetic toy checkpoint stands in at", CHECKPOINT)
checkpoint.main_inspect(CHECKPOINT, layer=str(LAYER))

# %%
layer_weights = checkpoint.layer_inputs_from(CHECKPOINT, LAYER, experts=[])  # routed experts are not needed here
real = sweep.bench("mhc_pre", tokens=[16], device=device, weights=layer_weights)
pd.DataFrame(real)[["op", "backend", "tokens", "layer", "metric", "value"]].query(
    "metric in ['time', 'max_abs', 'unavailable']")

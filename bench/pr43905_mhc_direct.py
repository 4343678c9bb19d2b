"""H100 benchmark of the TileLang mHC kernels (mhc_pre, mhc_post, mhc_fused_post_pre, hc_head) and of #43905
(CustomOp + torch.ops -> direct calls).

    python bench/pr43905_mhc_direct.py --out $OUT          # records -> $OUT/pr43905_mhc_direct.jsonl

    python bench/pr43905_mhc_direct.py --out $OUT --budget 120 --designs two_pass_v3_auto,two_pass,tile_kernels
                                                           # short run: the default vs the old default vs tile_kernels

Steps, in run order; every case is recorded as it finishes, a failing case becomes an "error" record (with the
message) and the run goes on; a time budget (``--budget``, default 150 s from the start) turns what is left into
"unavailable". Launcher default = VARIANTS[DEFAULT_VARIANT] ("two_pass_v3_auto": two_pass, v3 epilogue, prenorm
GEMM tile 128 from T = 4096 on, since the 42be99d H100 run); "two_pass" = the default before (v1/v2 epilogue,
64-token tile). Every variant label keeps the meaning it had in earlier runs' records.
0. Warm-up, in parallel subprocesses (``--warm-job``): the TileLang kernels of the default and of the swept variants
   for Flash (D=4096) and Pro (D=7168), tile_kernels' mHC kernels (if swept) and torch.compile of the references
   (not with ``--designs``: its pass comes last); then the main process loads them (disk-cache hits) and records
   per-kernel compile/load seconds ("startup"). No JIT happens inside a timing. Then each op runs once in its own
   subprocess (T in 1, 3, 70, 1000, 4096; "smoke_max_rel_err" vs the reference), and so does each swept variant
   (T in 1, 70, 1000; above 5 % it is not timed): an op that crashes, hangs or returns inf/NaN there is skipped,
   so it cannot poison this process's CUDA context.
1a. The DEFAULT first, both presets: numerics per op, T in {1, 3, 64, 1000, 4096}: lab.numerics.compare(oracle fp64,
   eager = fp32 reference on the GPU, fused = TileLang), err_ratio bar 2 (bf16 outputs); mixes (post, comb)
   relative to the fp32 reference (target 1e-5); then two eager calls and a CUDA-graph replay bitwise equal at
   T in {1, 1000, 4096} (4096: the 128-token GEMM tile); T = 0.
1b. Issue #6 design sweep (``--designs`` restricts it): mhc_pre / mhc_fused_post_pre / hc_head under each variant of
   VARIANTS (one_pass, l2_chunked, the _mhc_overlap designs small_t / small_t_256 / *_v3, fixed 64 or 128 GEMM
   tiles; hc_head only where its launches differ) and tile_kernels, at T in {1, 16, 256, 1024, 4096, 16384} (graph
   replay for T <= 256), each kernel of the default alone at T in {1, 4096, 16384} ("stage_time"); variants that
   launch the same kernels as one already timed get a "same_as" record. Records variant "design:<name>" with fields
   design / resolved_design / default_design / tuning / gemm_block_tokens, one "best_design" record per
   (preset, op, T), and a "design comparison" table printed last.
1c. Numerics (T in {1, 70, 1000}) and eager vs graph bitwise of the other swept variants.
2. Stage diagnostics (Flash, T in {3, 1000}): each kernel alone against an fp64 computation of exactly its job
   (prenorm GEMM partials summed over splits, 64- and 128-token tiles; epilogue fed exact mixes; post; fused
   GEMM's new residual; head epilogue). A failure here names the broken kernel. tile_kernels' numerics against
   the oracle of ITS semantics.
3. The #43905 refactor on the GPU (``pr43905_mhc_direct.run('cuda')``): bitwise before == after, allocations per
   call, host overhead (probes and real kernels), per layer / forward, graph replay before vs after.
4. Timing of the default, T in {1, 2, 4, ..., 256, 1024, 4096, 8192, 16384}, T >= 1024 first: pass A TileLang (CUDA
   events, L2 flushed; CUDA-graph replay for T <= 256) and tile_kernels (same; T in TK_TOKENS); pass B torch eager
   and pass C torch.compile of the reference (T in TORCH_TOKENS). Time, GB/s, % of the measured copy bandwidth
   (lab.roofline minimum bytes), ratio to tile_kernels.
tile_kernels differences (recorded as ``tk_semantics``): its pre has no RMSNorm weight on layer_input (compared
with our pre at norm_weight=None, timed both ways), may use DeepGEMM's TF32 prenorm GEMM (~1e-3), has no fused
post+pre (peer = its post then its pre), and its head pads fn to 24 rows.
``--cpu-dry-run`` runs the plumbing on a CPU: the real launchers with every kernel replaced by a torch emulation
(tests/_mhc_emulation.py), no CUDA graphs, tile_kernels or torch.compile (numbers meaningless).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

EXPERIMENT = "pr43905_mhc_direct"
OPS = ("mhc_pre", "mhc_post", "mhc_fused_post_pre", "hc_head")
PRESETS = ("flash", "pro")
TOKENS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 8192, 16384]
TORCH_TOKENS = [1, 16, 256, 1024, 4096, 16384]
TK_TOKENS = [1, 4, 16, 64, 256, 1024, 4096, 8192, 16384]   # tile_kernels may JIT per shape: fewer T
GRAPH_MAX_T = 256
VARIANT_KERNELS = ("onepass_pre", "onepass_fused", "onepass_head")
# design comparison (step 1b/4b, issue #6): the launcher designs of _mhc_common.TUNING["design"], each smoke-tested
# in its own subprocess, checked for numerics and timed per op (mhc_post has one design); plus two tuning variants
DESIGN_OPS = ("mhc_pre", "mhc_fused_post_pre", "hc_head")
NEW_DESIGNS = ("one_pass", "l2_chunked")
# (session 3: one_pass_bt16, one_pass_c16 and l2_chunked_32mb were dropped -- slower than one_pass / l2_chunked in
# the 18:01 H100 run, see data/results/h100 -- to keep this phase under 60 s with the issue #6 latency designs)
# Every label keeps the meaning it had in earlier runs' records: each variant pins the TUNING keys whose default
# changed after the 42be99d H100 run (overlap_epilogue False -> True, gemm_block_tokens 64 -> "auto").
OLD_PRE = {"overlap_epilogue": False, "gemm_block_tokens": 64}   # v1/v2 epilogue, 64-token GEMM tile
DEFAULT_VARIANT = "two_pass_v3_auto"   # = the launchers' TUNING (checked at start-up and in tests)
VARIANTS = {
    # the launcher default since the 42be99d H100 run: two_pass, v3 epilogue, GEMM tile per T (128 from T = 4096)
    "two_pass_v3_auto": {"design": "two_pass", "overlap_epilogue": True, "gemm_block_tokens": "auto"},
    "two_pass": {"design": "two_pass", **OLD_PRE},   # the launcher default BEFORE (records up to 42be99d)
    "one_pass": {"design": "one_pass", **OLD_PRE}, "l2_chunked": {"design": "l2_chunked", **OLD_PRE},
    "auto": {"design": "auto", **OLD_PRE},
    # issue #6 (_mhc_overlap): FMA split-K projection + v3 epilogue up to 32 tokens, two_pass + v3 above
    "small_t": {"design": "small_t", "overlap_epilogue": True, "gemm_block_tokens": 64},
    "small_t_256": {"design": "small_t", "overlap_epilogue": True, "gemm_block_tokens": 64, "small_t_max_tokens": 256},
    # the v3 epilogue (Sinkhorn on warp 0 overlapped with the collapse) in the existing designs
    "two_pass_v3": {"design": "two_pass", "overlap_epilogue": True, "gemm_block_tokens": 64},
    "l2_chunked_v3": {"design": "l2_chunked", "overlap_epilogue": True, "gemm_block_tokens": 64},
    # + the 128-token GEMM tile at every T
    "two_pass_v3_bt128": {"design": "two_pass", "overlap_epilogue": True, "gemm_block_tokens": 128}}
OVERLAP_VARIANTS = ("small_t", "small_t_256", "two_pass_v3", "l2_chunked_v3", "two_pass_v3_bt128")
OVERLAP_OPS = ("mhc_pre", "mhc_fused_post_pre")   # hc_head has no Sinkhorn: these variants do not change it
# variants smoke-tested in their own subprocess and checked for numerics (the default is, in steps 0 and 1a;
# "auto" resolves to one of the others)
SMOKED_VARIANTS = tuple(v for v in VARIANTS if v not in (DEFAULT_VARIANT, "auto"))
NUMERICS_VARIANTS = SMOKED_VARIANTS
# kernels of the launcher default per op (warm-up + load): a failure makes the op unavailable
DEFAULT_KERNELS = {"mhc_pre": ("gemm24", "gemm24_bt128", "pre_epi_v3"), "mhc_post": ("post",),
                   "mhc_fused_post_pre": ("post", "gemm24", "gemm24_bt128", "pre_epi_v3"),
                   "hc_head": ("gemm4", "head_epi", "head_epi_v1")}
# kernels (beyond those) that variants need for mhc_pre / mhc_fused_post_pre: a failure disables those variants
OVERLAP_KERNELS = {"small_proj24": ("small_t", "small_t_256"), "pre_epi_v3": OVERLAP_VARIANTS,
                   "gemm24_bt128": ("two_pass_v3_bt128",),
                   "pre_epi": ("two_pass", "l2_chunked", "auto"),     # the old epilogue: v2 ...
                   "pre_epi_v1": ("two_pass", "l2_chunked", "auto")}  # ... and v1 (many splits)
BASE_KERNELS = ("gemm24", "gemm4", "fused", "pre_epi", "head_epi", "head_epi_v1", "post")   # "fused": stage diag.
DEFAULT_GRAPH_TOKENS = (1, 1000, 4096)   # 4096: the 128-token GEMM tile of the default
VARIANT_TOKENS = [1, 16, 256, 1024, 4096, 16384]
STAGE_TOKENS = (1, 4096, 16384)      # two-pass stage timings (each kernel alone)
DESIGN_NUMERICS_TOKENS = [1, 70, 1000]   # 1000 > one chunk of l2_chunked (512 Flash / 256 Pro tokens)
DESIGN_SMOKE_MAX_REL = 0.05              # a new design above this (max |err| / max |ref|, any output) is not timed
NUMERICS_TOKENS = [1, 3, 64, 1000, 4096]
MIX_REL_TARGET = 1e-5
TL_CACHE = "/tmp/dsv4lab_tilelang_cache"
RMS_EPS = HC_EPS = 1e-6
POST_MULT, ITERS = 2.0, 20


# ---- inputs and an independent fp64 oracle ---------------------------------------------------------------
def make_case(preset: str, t: int, device: str, seed: int = 0) -> dict[str, Any]:
    """Realistic magnitudes: unit-RMS streams, fn ~ N(0, 1/nD), scales ~0.5-1.5, bf16 norm weights ~1."""
    import torch

    from dsv4lab.config import get_config

    d = get_config(preset).hidden_size
    n, nd = 4, 4 * d
    g = torch.Generator(device=device).manual_seed(seed)   # drawn on the device: T = 16384 Pro is 470M values
    rn = lambda *s: torch.randn(*s, generator=g, device=device)   # noqa: E731
    comb = torch.softmax(rn(t, n, n), -1)
    return {"residual": rn(t, n, d).bfloat16(), "f": rn(t, d).bfloat16(),
            "post": 2 * torch.rand(t, n, generator=g, device=device), "comb": comb / comb.sum(1, keepdim=True),
            "fn": rn(24, nd) * nd ** -0.5, "scale": 0.5 + rn(3).abs(), "base": 0.5 * rn(24),
            "norm_weight": (1 + 0.1 * rn(d)).bfloat16(), "head_fn": rn(4, nd) * nd ** -0.5,
            "head_scale": 0.5 + rn(1).abs(), "head_base": 0.5 * rn(4)}


def _sinkhorn64(c, iters, eps):
    import torch

    c = torch.softmax(c, -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def oracle_mixes64(residual, fn, scale, base):
    """fp64 m (the 24 or 4 projections times rho) of dsv4-layers.md 2.2 / 2.7."""
    import torch

    x = residual.flatten(1).double()
    return (x @ fn.double().T) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + RMS_EPS)


def oracle_pre64(residual, fn, scale, base, norm_weight):
    """(layer_input, post, comb) in fp64; the collapse is rounded to bf16 where the contract rounds it."""
    import torch

    t, n, _ = residual.shape
    m, s, b = oracle_mixes64(residual, fn, scale, base), scale.double(), base.double()
    pre = torch.sigmoid(m[:, :n] * s[0] + b[:n]) + HC_EPS
    post = torch.sigmoid(m[:, n:2 * n] * s[1] + b[n:2 * n]) * POST_MULT
    comb = _sinkhorn64((m[:, 2 * n:] * s[2] + b[2 * n:]).view(t, n, n), ITERS, HC_EPS)
    y = (pre.unsqueeze(-1) * residual.double()).sum(1).bfloat16().double()
    if norm_weight is not None:
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + RMS_EPS) * norm_weight.double()
    return y, post, comb


def oracle_post64(f, residual, post, comb):
    import torch

    return post.double().unsqueeze(-1) * f.double().unsqueeze(1) + torch.einsum(
        "tjk,tjd->tkd", comb.double(), residual.double())


def oracle_head64(residual, fn, scale, base):
    import torch

    m = oracle_mixes64(residual, fn, scale, base)
    pre = torch.sigmoid(m * scale.double()[0] + base.double()) + HC_EPS
    return (pre.unsqueeze(-1) * residual.double()).sum(1)


def strict_fp32() -> None:
    """The fp32 reference must be fp32: no TF32 in matmuls (its prenorm GEMM is what the mixes are held to)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


@contextlib.contextmanager
def tuning(**over):
    """Temporarily override ``_mhc_common.TUNING`` (the launchers read it at every call)."""
    from dsv4lab.kernels.tilelang import _mhc_common as common

    saved = dict(common.TUNING)
    common.TUNING.update(over)
    try:
        yield common.TUNING
    finally:
        common.TUNING.clear()
        common.TUNING.update(saved)


def default_design() -> str:
    """The VARIANTS name the launchers run under the current TUNING (DEFAULT_VARIANT first), else "custom:<design>"."""
    from dsv4lab.kernels.tilelang import _mhc_common as common

    for name in (DEFAULT_VARIANT, *VARIANTS):
        if all(common.TUNING.get(k) == v for k, v in VARIANTS[name].items()):
            return name
    return f"custom:{common.TUNING['design']}"


def parse_designs(spec: str | None) -> tuple[list[str], bool]:
    """``--designs a,b,...`` -> (variants of VARIANTS in sweep order, tile_kernels wanted); None: everything."""
    if spec is None:
        return list(VARIANTS), True
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in VARIANTS and n != "tile_kernels"]
    if bad or not names:
        raise ValueError(f"--designs: unknown {bad or spec!r}; expected a comma list of {list(VARIANTS)} "
                         f"and/or tile_kernels")
    return [v for v in VARIANTS if v in names], "tile_kernels" in names


def warm_kinds(variants: list[str], restricted: bool) -> list[str]:
    """TileLang kernels to build per preset: the default's, the selected variants' (all of them unrestricted)."""
    kinds = list(dict.fromkeys(k for ks in DEFAULT_KERNELS.values() for k in ks))
    if not restricted:
        kinds += [k for k in BASE_KERNELS + VARIANT_KERNELS + tuple(OVERLAP_KERNELS) if k not in kinds]
        return kinds
    kinds += [k for k, vs in OVERLAP_KERNELS.items() if set(vs) & set(variants) and k not in kinds]
    if {"one_pass", "auto"} & set(variants):
        kinds += list(VARIANT_KERNELS)
    return kinds


# ---- warm-up jobs (each in its own process; results land in the on-disk caches) -------------------------
def warm_jobs(kinds: list[str], presets, tile_kernels: bool = True, torch_compile: bool = True) -> list[str]:
    """``--designs`` runs leave out torch.compile (its pass comes last, past a short budget) and, unless listed,
    tile_kernels: ~45 s jobs each on the H100 host."""
    jobs = [f"tl:{p}:{k}" for p in presets for k in kinds]
    return jobs + [f"tk:{p}" for p in presets if tile_kernels] + [f"tc:{op}" for op in OPS if torch_compile]


def tl_kernel(preset: str, kind: str):
    """Build (compile or load from cache) one TileLang kernel; returns the compiled kernel."""
    from dsv4lab.config import get_config
    from dsv4lab.kernels.tilelang import _mhc_common as common
    from dsv4lab.kernels.tilelang import _mhc_onepass as onepass
    from dsv4lab.kernels.tilelang import _mhc_overlap as overlap
    from dsv4lab.kernels.tilelang import hc_head, mhc_fused_post_pre, mhc_post, mhc_pre

    d, arch = get_config(preset).hidden_size, common.device_arch()
    if kind.endswith("_bt16"):
        with tuning(onepass_block_tokens=16):
            return tl_kernel(preset, kind.removesuffix("_bt16"))
    if kind.endswith("_c16"):
        with tuning(onepass_cluster=16):
            return tl_kernel(preset, kind.removesuffix("_c16"))
    return {"gemm24": lambda: mhc_pre.prenorm_gemm_kernel(4 * d, 24, arch),
            "gemm4": lambda: mhc_pre.prenorm_gemm_kernel(4 * d, 4, arch),
            "fused": lambda: mhc_fused_post_pre.post_prenorm_gemm_kernel(d, arch),
            "pre_epi": lambda: mhc_pre.pre_epilogue_kernel(d, arch, "bfloat16", RMS_EPS, HC_EPS, POST_MULT, ITERS),
            "head_epi": lambda: hc_head.head_epilogue_kernel(d, arch, RMS_EPS, HC_EPS),
            "post": lambda: mhc_post.post_kernel(d, arch),
            "pre_epi_v1": lambda: mhc_pre.pre_epilogue_kernel(d, arch, "bfloat16", RMS_EPS, HC_EPS, POST_MULT, ITERS,
                                                              "v1"),
            "head_epi_v1": lambda: hc_head.head_epilogue_kernel(d, arch, RMS_EPS, HC_EPS, "v1"),
            "onepass_pre": lambda: onepass.kernel_for("pre", d, None, "bfloat16", RMS_EPS, HC_EPS, POST_MULT, ITERS),
            "onepass_fused": lambda: onepass.kernel_for("fused", d, None, "bfloat16", RMS_EPS, HC_EPS, POST_MULT,
                                                        ITERS),
            "onepass_head": lambda: onepass.kernel_for("head", d, None, None, RMS_EPS, HC_EPS),
            "small_proj24": lambda: overlap.small_proj_kernel(4 * d, 24, arch),
            "gemm24_bt128": lambda: mhc_pre.prenorm_gemm_kernel(4 * d, 24, arch, block_tokens=128),
            "pre_epi_v3": lambda: mhc_pre.pre_epilogue_kernel(d, arch, "bfloat16", RMS_EPS, HC_EPS, POST_MULT, ITERS,
                                                              "v3")}[kind]()


def run_warm_job(job: str) -> dict[str, Any]:
    import torch

    strict_fp32()
    t0 = time.perf_counter()
    kind, *rest = job.split(":")
    if kind == "tl":
        tl_kernel(rest[0], rest[1])
    elif kind == "tk":
        tk = TileKernelsPeer()
        for t in (1, 4096):
            c = make_case(rest[0], t, "cuda")
            for op in OPS:
                tk.call(op, c)
        torch.cuda.synchronize()
    elif kind == "smoke":   # run one op's kernels in a throw-away process: a crash or hang cannot poison ours
        op, worst, dev = rest[0], {}, "cuda" if torch.cuda.is_available() else "cpu"
        if len(rest) > 2:   # smoke:<op>:<presets>:<variant of VARIANTS>
            from dsv4lab.kernels.tilelang import _mhc_common as common

            common.TUNING.update(VARIANTS[rest[2]])
        for p in rest[1].split(","):
            # 4096: several tokens per epilogue block; a design variant: 1000 spans several l2_chunked chunks
            for t in ((1, 3, 70, 1000, 4096) if len(rest) == 2 else (1, 70, 1000)):
                c = make_case(p, t, dev, seed=t)
                got, want = tilelang_call(op, c), reference_call(None, op, c)
                if dev == "cuda":
                    torch.cuda.synchronize()
                got, want = (got if isinstance(got, tuple) else (got,)), (want if isinstance(want, tuple) else (want,))
                for i, (g, w) in enumerate(zip(got, want)):
                    err = float((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30))
                    key = f"{p}:out{i}"
                    worst[key] = max(worst.get(key, 0.0), err if torch.isfinite(g.float()).all() else float("inf"))
        return {"job": job, "seconds": time.perf_counter() - t0, "max_rel_err": worst}
    elif kind == "tc":
        fn = compiled_reference(rest[0])
        for p in PRESETS:
            for t in (1, 1024):
                reference_call(fn, rest[0], make_case(p, t, "cuda"))
        torch.cuda.synchronize()
    return {"job": job, "seconds": time.perf_counter() - t0}


def launch_warm_jobs(jobs: list[str], timeout: float) -> dict[str, dict]:
    """Run the warm-up jobs in parallel subprocesses; {job: {"seconds"} or {"error"}}."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    procs = {j: subprocess.Popen([sys.executable, __file__, "--warm-job", j], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True, env=env, cwd=str(REPO)) for j in jobs}
    deadline, out = time.perf_counter() + timeout, {}
    for j, p in procs.items():
        try:
            so, se = p.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            lines = [ln for ln in so.strip().splitlines() if ln.startswith("{")]
            out[j] = json.loads(lines[-1]) if p.returncode == 0 and lines else {
                "error": (se.strip().splitlines() or [f"exit {p.returncode}"])[-1][:400]}
        except subprocess.TimeoutExpired:
            p.kill()
            out[j] = {"error": f"warm-up job timed out after {timeout:.0f} s"}
    return out


# ---- the implementations under test -------------------------------------------------------------------------
def tilelang_call(op: str, c: dict, norm: bool = True):
    from dsv4lab.kernels.tilelang import hc_head, mhc_fused_post_pre, mhc_post, mhc_pre

    w = c["norm_weight"] if norm else None
    if op == "mhc_pre":
        return mhc_pre.mhc_pre(c["residual"], c["fn"], c["scale"], c["base"], w)
    if op == "mhc_post":
        return mhc_post.mhc_post(c["f"], c["residual"], c["post"], c["comb"])
    if op == "mhc_fused_post_pre":
        return mhc_fused_post_pre.mhc_fused_post_pre(c["f"], c["residual"], c["post"], c["comb"], c["fn"],
                                                     c["scale"], c["base"], w)
    return hc_head.hc_head(c["residual"], c["head_fn"], c["head_scale"], c["head_base"])


def reference_call(fns, op: str, c: dict, norm: bool = True):
    """Call the reference (or a torch.compile of it: ``fns``) with the op's arguments."""
    from dsv4lab.kernels.reference import mhc as ref

    fn = fns or getattr(ref, op)
    w = c["norm_weight"] if norm else None
    if op == "mhc_pre":
        return fn(c["residual"], c["fn"], c["scale"], c["base"], w)
    if op == "mhc_post":
        return fn(c["f"], c["residual"], c["post"], c["comb"])
    if op == "mhc_fused_post_pre":
        return fn(c["f"], c["residual"], c["post"], c["comb"], c["fn"], c["scale"], c["base"], w)
    return fn(c["residual"], c["head_fn"], c["head_scale"], c["head_base"])


def compiled_reference(op: str):
    import torch

    from dsv4lab.kernels.reference import mhc as ref

    return torch.compile(getattr(ref, op), dynamic=True)


class TileKernelsPeer:
    """tile_kernels 2.1.0 (``tile_kernels.mhc``) set up to DSv4 semantics where its API allows (module docstring
    lists the gaps). Its pre is two calls: DeepGEMM's ``tf32_hc_prenorm_gemm`` (split-K partials), then
    ``mhc_pre_big_fuse_fwd``; hc_head = the same GEMM (fn zero-padded to 24 rows), a torch reduction of the
    partials, ``mhc_head_compute_mix_fwd`` and ``mhc_pre_apply_mix_fwd``. If DeepGEMM's GEMM fails, the partials
    come from torch (one split) and ``notes`` says so. ``api`` names what was found."""

    N_SPLITS = 16   # mhc_pre_big_fuse_fwd's default split count

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.notes: list[str] = []
        try:
            import tile_kernels.mhc as tkm
        except Exception as e:
            raise RuntimeError(f"tile_kernels.mhc not importable: {type(e).__name__}: {e}") from e
        self.tkm, self.api = tkm, "tile_kernels.mhc (2.1.0 low-level API)"
        try:
            import deep_gemm
            self.gemm = deep_gemm.tf32_hc_prenorm_gemm
            self.notes.append("prenorm GEMM: deep_gemm.tf32_hc_prenorm_gemm (TF32, ~1e-3 on the mixes)")
        except Exception as e:
            self.gemm = None
            self.notes.append(f"prenorm GEMM: torch fp32 (deep_gemm unavailable: {type(e).__name__}: {e})")
        self._head_fn: dict[int, Any] = {}

    def partials(self, residual, fn):
        """(out_mul [S, T, 24], out_sqrsum [S, T]) of flatten(residual) against fn [24, nD]."""
        torch = self.torch
        t = residual.shape[0]
        x = residual.view(t, -1)
        if self.gemm is not None:
            try:
                s = self.N_SPLITS
                mul = torch.empty(s, t, fn.shape[0], dtype=torch.float32, device=x.device)
                sq = torch.empty(s, t, dtype=torch.float32, device=x.device)
                self.gemm(x, fn, mul, sq, s)
                return mul, sq
            except Exception as e:   # record once, then use the torch partials
                self.gemm = None
                self.notes.append(f"deep_gemm.tf32_hc_prenorm_gemm failed ({type(e).__name__}: {str(e)[:200]}); "
                                  "torch fp32 partials instead")
        xf = x.float()
        return (xf @ fn.T).unsqueeze(0), xf.pow(2).sum(-1).unsqueeze(0)

    def pre(self, residual, fn, scale, base):
        torch = self.torch
        t, n, d = residual.shape
        mul, sq = self.partials(residual, fn)
        post = torch.empty(t, n, dtype=torch.float32, device=residual.device)
        comb = torch.empty(t, n * n, dtype=torch.float32, device=residual.device)
        layer_input = torch.empty(t, d, dtype=torch.bfloat16, device=residual.device)
        self.tkm.mhc_pre_big_fuse_fwd(mul, sq, scale, base, residual, post, comb, layer_input, RMS_EPS, HC_EPS,
                                      HC_EPS, POST_MULT, ITERS, n_splits=mul.shape[0])
        return layer_input, post, comb.view(t, n, n)

    def head(self, residual, fn, scale, base):
        torch = self.torch
        t, n, d = residual.shape
        key = fn.data_ptr()
        if key not in self._head_fn:   # its prenorm GEMM is built for 24 rows: zero-pad the 4 head rows
            self._head_fn = {key: torch.cat([fn, fn.new_zeros(24 - fn.shape[0], fn.shape[1])]).contiguous()}
        mul, sq = self.partials(residual, self._head_fn[key])
        mix = (mul.sum(0)[:, :n] * torch.rsqrt(sq.sum(0) / (n * d) + RMS_EPS).unsqueeze(-1)).contiguous()
        pre = torch.empty(t, n, dtype=torch.float32, device=residual.device)
        self.tkm.mhc_head_compute_mix_fwd(mix, scale, base, pre, HC_EPS)
        out = torch.empty(t, d, dtype=torch.bfloat16, device=residual.device)
        self.tkm.mhc_pre_apply_mix_fwd(residual, pre, out)
        return out

    def call(self, op: str, c: dict):
        with self.torch.inference_mode():
            if op == "mhc_pre":
                return self.pre(c["residual"], c["fn"], c["scale"], c["base"])
            if op == "mhc_post":
                return self._post(c["f"], c["residual"], c["post"], c["comb"])
            if op == "mhc_fused_post_pre":   # no fused kernel there: its post, then its pre
                r = self._post(c["f"], c["residual"], c["post"], c["comb"])
                return (r, *self.pre(r, c["fn"], c["scale"], c["base"]))
            return self.head(c["residual"], c["head_fn"], c["head_scale"], c["head_base"])

    def _post(self, f, residual, post, comb):
        t, n, d = residual.shape
        out = self.tkm.mhc_post_fwd(f.view(1, t, d), residual.view(1, t, n, d), post.view(1, t, n, 1),
                                    comb.view(1, t, n, n))
        return out.view(t, n, d)


# ---- the run ----------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, out: Path, budget: float, dev: str) -> None:
        from dsv4lab.lab import results

        self.results, self.path, self.dev = results, out / f"{EXPERIMENT}.jsonl", dev
        self.t_start, self.budget = time.perf_counter(), budget
        self.summary: list[str] = []
        self.times: dict[tuple, float] = {}
        self.design_times: dict[tuple, float] = {}   # (preset, op, T, variant name) -> p50 us
        self.design_same: dict[tuple, str] = {}      # (preset, op, T, variant name) -> the variant it launches as
        self.default_design = default_design()         # the launchers' TUNING["design"] at the start
        self.design_lines: list[str] = []               # design_summary's table, printed last

    def left(self) -> float:
        return self.budget - (time.perf_counter() - self.t_start)

    def rec(self, op, backend, variant, preset, tokens, metric, unit, value, dtype="bfloat16", **extra) -> dict:
        return self.results.record(EXPERIMENT, op, backend, variant, preset, tokens, dtype, metric, unit, value,
                                   **extra)

    def save(self, recs: list[dict]) -> list[dict]:
        if recs:
            self.results.append(self.path, recs)
        return recs

    def guarded(self, what: str, fn: Callable[[], list[dict]], op="-", backend="tilelang", preset=None, tokens=None,
                variant="-", min_left: float = 0.0) -> list[dict]:
        """Run one case: records on success; an 'error' record (message + last traceback line) on failure;
        'unavailable' when the budget is spent."""
        if self.left() < min_left:
            return self.save([self.rec(op, backend, variant, preset, tokens, "unavailable", None, None,
                                       reason=f"time budget ({self.budget:.0f} s) spent before: {what}")])
        try:
            return self.save(fn())
        except Exception as e:
            tb = traceback.format_exc().strip().splitlines()
            msg = f"{type(e).__name__}: {str(e).strip()[:600]}"
            print(f"  ERROR {what}: {msg}")
            return self.save([self.rec(op, backend, variant, preset, tokens, "error", None, None, message=msg,
                                       where=what, traceback_tail=tb[-6:])])


def stage_diagnostics(R: Runner, preset: str, t: int) -> list[dict]:
    """Each TileLang kernel alone vs fp64 of its own job (see the module docstring, step 1)."""
    import torch

    from dsv4lab.kernels.tilelang import _mhc_common as common
    from dsv4lab.kernels.tilelang import hc_head, mhc_fused_post_pre, mhc_post, mhc_pre

    c = make_case(preset, t, R.dev, seed=11)
    r, d, dev = c["residual"], c["residual"].shape[2], R.dev
    arch, recs = common.device_arch(), []
    x64 = r.flatten(1).double()

    def rel(a, b) -> float:
        return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))

    def add(stage: str, value: float, target: float, **extra) -> None:
        ok = value <= target
        recs.append(R.rec(stage, "tilelang", "stage", preset, t, "max_rel_err", "1", value, target=target,
                          passed=ok, **extra))
        R.summary.append(f"stage {stage:<26} {preset:<5} T={t:<5} max_rel={value:.2e} "
                         f"(target {target:.0e}) {'ok' if ok else 'FAIL'}")

    for n_mix, fn, tile in ((24, c["fn"], 64), (24, c["fn"], 128), (4, c["head_fn"], 64)):
        for splits in sorted({1, mhc_pre.gemm_splits(t, 4 * d, r.device, tile)}):
            mp = torch.full((splits, t, n_mix), float("nan"), device=dev)
            sq = torch.full((splits, t), float("nan"), device=dev)
            mhc_pre.prenorm_gemm_kernel(4 * d, n_mix, arch, block_tokens=tile)(r.view(t, -1), fn, mp, sq)
            name = f"prenorm_gemm{n_mix}" + ("_bt128" if tile == 128 else "")
            add(f"{name}.mix", rel(mp.sum(0), x64 @ fn.double().T), 1e-5, n_splits=splits)
            add(f"{name}.sumsq", rel(sq.sum(0), x64.pow(2).sum(-1)), 1e-5, n_splits=splits)
    # epilogue fed the exact partials (one split) -> compare with the fp32 reference given the same mixes
    mixes = (x64 @ c["fn"].double().T).float().unsqueeze(0).contiguous()
    sqs = x64.pow(2).sum(-1).float().unsqueeze(0).contiguous()
    li, po, co = (torch.full((t, d), float("nan"), device=dev, dtype=torch.bfloat16),
                  torch.full((t, 4), float("nan"), device=dev), torch.full((t, 4, 4), float("nan"), device=dev))
    mhc_pre.run_pre_epilogue(mixes, sqs, r, c["scale"], c["base"], c["norm_weight"],
                             (RMS_EPS, HC_EPS, POST_MULT, ITERS), li, po, co)
    y, post64, comb64 = oracle_pre64(r, c["fn"], c["scale"], c["base"], c["norm_weight"])
    add("pre_epilogue.post", rel(po, post64), 1e-5)
    add("pre_epilogue.comb", rel(co, comb64), 1e-5)
    add("pre_epilogue.layer_input", rel(li, y), 2 ** -7, note="bf16 output: a few ulps")
    out = mhc_post.mhc_post(c["f"], r, c["post"], c["comb"])
    add("post", rel(out, oracle_post64(c["f"], r, c["post"], c["comb"])), 2 ** -7)
    k = mhc_fused_post_pre.post_prenorm_gemm_kernel(d, arch)
    nr = torch.full_like(r, float("nan"))
    mp, sq = torch.full((1, t, 24), float("nan"), device=dev), torch.full((1, t), float("nan"), device=dev)
    k(c["f"], r, c["post"], c["comb"], c["fn"].view(24, 4, d), nr, mp, sq)
    add("fused_gemm.new_residual_vs_post", rel(nr, out), 2 ** -7, bitwise_equal=bool(torch.equal(nr, out)))
    nr64 = nr.flatten(1).double()
    add("fused_gemm.mix", rel(mp.sum(0), nr64 @ c["fn"].double().T), 1e-5)
    add("fused_gemm.sumsq", rel(sq.sum(0), nr64.pow(2).sum(-1)), 1e-5)
    head = hc_head.hc_head(r, c["head_fn"], c["head_scale"], c["head_base"])
    add("hc_head", rel(head, oracle_head64(r, c["head_fn"], c["head_scale"], c["head_base"])), 2 ** -7)
    return recs


def numerics_case(R: Runner, preset: str, op: str, t: int, impl: Callable, backend: str, norm: bool = True,
                  semantics: str = "dsv4", design: str | None = None) -> list[dict]:
    """compare(oracle, eager reference, fused) for every output of ``op``; mixes also vs the fp32 reference."""
    import torch

    from dsv4lab.lab import numerics

    c = make_case(preset, t, R.dev, seed=100 + t)
    w = c["norm_weight"] if norm else None
    got, eager = impl(op, c), reference_call(None, op, c, norm=norm)
    if op == "mhc_pre":
        oracle, names = oracle_pre64(c["residual"], c["fn"], c["scale"], c["base"], w), ("layer_input", "post", "comb")
    elif op == "mhc_post":
        oracle, names, got, eager = (oracle_post64(c["f"], c["residual"], c["post"], c["comb"]),), ("residual",), (got,), (eager,)
    elif op == "mhc_fused_post_pre":
        # the pre half reads the ROUNDED new residual (the contract): its oracle and its eager reference are taken
        # on the kernel's own new residual, which may differ from the reference's by a bf16 ulp (post summation
        # order) -- enough to move the mixes by ~1e-4 on its own. The new residual is checked separately.
        nr = got[0]
        oracle = (oracle_post64(c["f"], c["residual"], c["post"], c["comb"]),
                  *oracle_pre64(nr, c["fn"], c["scale"], c["base"], w))
        eager = (eager[0], *reference_call(None, "mhc_pre", dict(c, residual=nr), norm=norm))
        names = ("new_residual", "layer_input", "post", "comb")
    else:
        oracle, names, got, eager = (oracle_head64(c["residual"], c["head_fn"], c["head_scale"], c["head_base"]),), ("out",), (got,), (eager,)
    recs, fields = [], dict(experiment=EXPERIMENT, op=op, backend=backend, preset=preset, tokens=t,
                            semantics=semantics, norm_weight=norm,
                            pre_half_input="own new residual" if op == "mhc_fused_post_pre" else None,
                            design=design or (default_design() if backend.startswith("tilelang") else None))
    for name, o, e, f in zip(names, oracle, eager, got):
        if f.shape != e.shape or f.dtype != e.dtype:
            raise AssertionError(f"{name}: got {tuple(f.shape)} {f.dtype}, expected {tuple(e.shape)} {e.dtype}")
        cmp = numerics.compare(o, e, f)
        recs += cmp.to_records(variant=name, **fields)
        line = f"num {backend:<12} {fields['design'] or '':<10} {op:<19} {name:<12} {preset:<5} T={t:<5} " \
               f"{cmp.summary()[:100]}"
        if f.dtype == torch.float32:
            mrel = float((f - e).abs().max() / e.abs().max().clamp_min(1e-30)) if f.numel() else 0.0
            recs.append(R.rec(op, backend, name, preset, t, "mix_rel_err_vs_fp32_ref", "1", mrel, dtype="float32",
                              target=MIX_REL_TARGET, passed=mrel <= MIX_REL_TARGET, semantics=semantics,
                              design=fields["design"]))
            line += f" | vs fp32 ref {mrel:.1e}"
        R.summary.append(line)
    return recs


def graph_and_determinism(R: Runner, preset: str, op: str, t: int, design: str | None = None) -> list[dict]:
    """Two eager calls and one CUDA-graph replay of the TileLang op: all bitwise equal (no atomics anywhere)."""
    import torch

    c = make_case(preset, t, "cuda", seed=7)
    as_tuple = lambda x: x if isinstance(x, tuple) else (x,)   # noqa: E731
    a, b = as_tuple(tilelang_call(op, c)), as_tuple(tilelang_call(op, c))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        tilelang_call(op, c)
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = as_tuple(tilelang_call(op, c))
    g.replay()
    torch.cuda.synchronize()
    det = all(torch.equal(x, y) for x, y in zip(a, b))
    gr = all(torch.equal(x, y) for x, y in zip(a, static))
    design = design or default_design()
    R.summary.append(f"bitwise {op:<19} {design:<10} {preset:<5} T={t:<5} eager==eager {det}  eager==graph {gr}")
    return [R.rec(op, "tilelang", "eager_vs_eager", preset, t, "bitwise_equal", "bool", det, design=design),
            R.rec(op, "tilelang", "eager_vs_graph", preset, t, "bitwise_equal", "bool", gr, design=design)]


def empty_tokens(R: Runner, preset: str) -> list[dict]:
    recs = []
    c = make_case(preset, 0, R.dev)
    for op in OPS:
        outs = tilelang_call(op, c)
        outs = outs if isinstance(outs, tuple) else (outs,)
        ok = all(o.shape[0] == 0 for o in outs)
        recs.append(R.rec(op, "tilelang", "T=0", preset, 0, "empty_outputs", "bool", ok,
                          shapes=[list(o.shape) for o in outs]))
    return recs


def time_case(R: Runner, preset: str, op: str, t: int, backend: str, fn: Callable, peaks, graph: bool,
              keep: bool = True, **extra) -> list[dict]:
    """One timing record; ``keep`` False leaves the summary table (R.times) alone (design sweep)."""
    from dsv4lab.config import get_config
    from dsv4lab.lab import roofline, timing

    d = get_config(preset).hidden_size
    cost = roofline.cost(op, T=t, D=d)
    tm = timing.bench(fn, graph=graph, flush_l2=True, warmup=3, rep=20)
    if graph and t == 1:
        extra.setdefault("target_us", 15.0)   # decode: one op per graph replay
    rec = tm.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op=op, backend=backend,
                       variant="graph" if graph else "eager", preset=preset, tokens=t, dtype="bfloat16",
                       gb_per_s=cost.bytes / (tm.p50 * 1e-6) / 1e9, **extra)
    if keep:
        R.times[(preset, op, t, backend, rec["variant"], extra.get("norm_weight", True))] = tm.p50
    return [rec]


def design_sweep(R: Runner, preset: str, t: int, peaks, design_ok: dict, tk=None, tk_ok=None,
                 variants=None) -> list[dict]:
    """Step 1b (issue #6): (1) at STAGE_TOKENS each kernel of the two-pass design alone (where its time goes);
    (2) mhc_pre / mhc_fused_post_pre / hc_head under every TUNING variant of VARIANTS (variant "design:<name>";
    CUDA-graph replay for T <= GRAPH_MAX_T, CUDA events with L2 flush above). A variant that resolves to a
    configuration already timed at this (preset, op, T) -- e.g. l2_chunked with T within one chunk -- gets a
    "same_as" record instead of a second timing. ``design_ok[(op, design)]``: its subprocess smoke passed.
    ``variants``: the names of VARIANTS to time (``--designs``), in VARIANTS order (the default first).
    tile_kernels (``tk``) is timed in the same way at the same T, so each design's ratio to it is like for like."""
    from dsv4lab.kernels.tilelang import _mhc_common as common

    c, recs = make_case(preset, t, R.dev, seed=t), []
    d, graph = c["residual"].shape[2], t <= GRAPH_MAX_T and R.dev == "cuda"
    if tk is not None:
        for op in DESIGN_OPS:
            if (tk_ok or {}).get(op):
                try:
                    rec = time_case(R, preset, op, t, "tile_kernels", lambda: tk.call(op, c), peaks, graph,
                                    keep=False, norm_weight=op == "hc_head")[0]
                    rec["variant"] = "design:tile_kernels"
                    recs.append(rec)
                    R.design_times[(preset, op, t, "tile_kernels")] = rec["value"]
                except Exception as e:
                    recs.append(R.rec(op, "tile_kernels", "design:tile_kernels", preset, t, "error", None, None,
                                      message=f"{type(e).__name__}: {str(e)[:400]}"))
    if t in STAGE_TOKENS and R.dev == "cuda":
        with tuning(**VARIANTS[DEFAULT_VARIANT]):   # the default's kernels, each alone
            recs += _stage_times(R, preset, t, c, peaks, t == 1)
    timed: dict[tuple, str] = {}
    for vname in (variants if variants is not None else list(VARIANTS)):
        with tuning(**VARIANTS[vname]):
            resolved = common.design_for(t, d)
            for op in DESIGN_OPS:
                if vname in OVERLAP_VARIANTS and op not in OVERLAP_OPS:
                    continue   # hc_head: identical launches to two_pass / l2_chunked
                key = launch_key(d, t, 4 if op == "hc_head" else 24)
                base_rec = dict(design=vname, resolved_design=resolved, default_design=R.default_design,
                                tuning=dict(common.TUNING), gemm_block_tokens=key[-1])
                smoked = vname if (op, vname) in design_ok else resolved   # "auto" -> the design it resolves to
                if not design_ok.get((op, smoked), False):
                    recs.append(R.rec(op, "tilelang", f"design:{vname}", preset, t, "unavailable", None, None,
                                      reason=f"{smoked} failed to load or its subprocess smoke test", **base_rec))
                    continue
                if (op, key) in timed:
                    recs.append(R.rec(op, "tilelang", f"design:{vname}", preset, t, "same_as", None,
                                      timed[(op, key)], **base_rec))
                    R.design_same[(preset, op, t, vname)] = timed[(op, key)]
                    continue
                try:
                    rec = time_case(R, preset, op, t, "tilelang", lambda: tilelang_call(op, c), peaks, graph,
                                    keep=False)[0]
                    rec.update(variant=f"design:{vname}", **base_rec)
                    recs.append(rec)
                    timed[(op, key)] = vname
                    R.design_times[(preset, op, t, vname)] = rec["value"]
                    R.summary.append(f"design {vname:<15} {op:<19} {preset:<5} T={t:<6} {rec['value']:9.1f} us "
                                     f"{(rec.get('pct_of_peak') or 0):5.1f}% ({rec['variant']}, {resolved}, "
                                     f"{'graph' if graph else 'events'})")
                except Exception as e:
                    recs.append(R.rec(op, "tilelang", f"design:{vname}", preset, t, "error", None, None,
                                      message=f"{type(e).__name__}: {str(e)[:400]}", **base_rec))
                    print(f"  ERROR design {vname} {op} {preset} T={t}: {type(e).__name__}: {str(e)[:200]}")
    del c
    return recs


def launch_key(d: int, t: int, n_mix: int = 24) -> tuple:
    """What the launchers run for hidden size ``d``, T = ``t`` and an ``n_mix``-row GEMM (24: mhc_pre and the fused
    op, 4: hc_head) under the current TUNING: variants with equal keys launch the same kernels (the sweep and the
    1c numerics check each key once). The last entry is the GEMM token tile (None: no GEMM)."""
    from dsv4lab.kernels.tilelang import _mhc_common as common
    from dsv4lab.kernels.tilelang import _mhc_onepass as onepass

    resolved = common.design_for(t, d)
    chunk = common.chunk_tokens(d) if resolved == "l2_chunked" else None
    return (resolved, (onepass.block_tokens(d), common.onepass_cluster(d)) if resolved == "one_pass" else None,
            chunk,
            n_mix == 24 and (bool(common.TUNING["overlap_epilogue"]) or resolved == "small_t"),   # pre epilogue v3
            None if resolved in ("small_t", "one_pass")   # no prenorm GEMM; l2_chunked: the tile of a full chunk
            else common.gemm_block_tokens(min(t, chunk) if chunk else t, n_mix))


def _stage_times(R: Runner, preset: str, t: int, c: dict, peaks, graph: bool) -> list[dict]:
    """Each kernel of the two-pass design alone (stage_time records)."""
    import torch

    from dsv4lab.kernels.tilelang import _mhc_common as common
    from dsv4lab.kernels.tilelang import hc_head, mhc_post, mhc_pre

    recs = []
    r, d, dev = c["residual"], c["residual"].shape[2], torch.device("cuda")
    arch = common.device_arch()
    tpb = common.tokens_per_block(t, common.sm_count(0))
    for n_mix, fn, name in ((24, c["fn"], "prenorm_gemm24"), (4, c["head_fn"], "prenorm_gemm4")):
        tile = common.gemm_block_tokens(t, n_mix)
        s = mhc_pre.gemm_splits(t, 4 * d, dev, tile)
        mp, sq = torch.empty(s, t, n_mix, device=dev), torch.empty(s, t, device=dev)
        k = mhc_pre.gemm_kernel(4 * d, n_mix, dev, tile)
        recs += time_case(R, preset, "mhc_pre" if n_mix == 24 else "hc_head", t, "tilelang",
                          lambda: k(r.view(t, -1), fn, mp, sq), peaks, graph, keep=False, stage=name, n_splits=s,
                          gemm_block_tokens=tile)
        if n_mix == 24:
            li, po, co = torch.empty(t, d, dtype=torch.bfloat16, device=dev), torch.empty(t, 4, device=dev), \
                torch.empty(t, 4, 4, device=dev)
            recs += time_case(R, preset, "mhc_pre", t, "tilelang", lambda: mhc_pre.run_pre_epilogue(
                mp, sq, r, c["scale"], c["base"], c["norm_weight"], (RMS_EPS, HC_EPS, POST_MULT, ITERS), li, po, co),
                peaks, graph, keep=False, stage="pre_epilogue", n_splits=s, tokens_per_block=tpb,
                epilogue=mhc_pre.pre_epilogue_design(s))
        else:
            out = torch.empty(t, d, dtype=torch.bfloat16, device=dev)
            ek = hc_head.head_epilogue_kernel(d, arch, RMS_EPS, HC_EPS, mhc_pre.epilogue_design(s))
            recs += time_case(R, preset, "hc_head", t, "tilelang", lambda: ek(
                mp, sq, r, c["head_scale"], c["head_base"], out, tpb), peaks, graph, keep=False, stage="head_epilogue",
                n_splits=s, tokens_per_block=tpb)
    recs += time_case(R, preset, "mhc_post", t, "tilelang", lambda: mhc_post.mhc_post(
        c["f"], r, c["post"], c["comb"]), peaks, graph, keep=False, stage="post")
    for rec in recs:   # stage timings: the op's roofline does not apply to one kernel of it
        rec["variant"], rec["metric"] = f"stage:{rec['stage']}", "stage_time"
        for k in ("pct_of_peak", "bytes", "flops", "intensity", "bound", "gb_per_s", "peak"):
            rec.pop(k, None)   # the op's roofline bytes do not describe one kernel of it
        R.summary.append(f"stage time {rec['stage']:<16} {preset:<5} T={t:<6} {rec['value']:9.1f} us")
    return recs


def design_summary(R: Runner, presets, tokens, names=None) -> list[dict]:
    """Per (preset, op, T): the fastest design of the sweep, its speedup over two_pass (the launcher default before
    the 42be99d H100 run) and its ratio to tile_kernels (timed alike); printed as a table ("=name": same launches
    as variant name) with a per-op recommendation for small (T <= 256, graph replay) and large (T >= 1024) T.
    Records: metric "best_design" (value = variant name)."""
    names = list(VARIANTS) if names is None else list(names)
    recs, lines = [], [f"\ndesign comparison (us, p50; graph replay for T <= {GRAPH_MAX_T}; launcher default: "
                        f"{R.default_design!r}; two_pass = the default before)",
                        f"{'preset':<6} {'op':<19} {'T':>6} " + " ".join(f"{n[:17]:>17}" for n in names)
                        + f" {'tile_kernels':>12} {'best':>15} {'x two_pass':>10} {'x tk':>6}"]
    votes: dict[tuple, dict] = {}
    for p in presets:
        for op in DESIGN_OPS:
            for t in tokens:
                got = {n: R.design_times.get((p, op, t, n)) for n in names}
                timed = {n: v for n, v in got.items() if v}
                if not timed:
                    continue
                best = min(timed, key=timed.get)
                tkt = R.design_times.get((p, op, t, "tile_kernels"))
                two = got.get("two_pass") or R.design_times.get((p, op, t, R.design_same.get((p, op, t, "two_pass"))))
                f = lambda x: f"{x:.1f}" if x else "-"   # noqa: E731
                cell = lambda n: f(got[n]) if got[n] else (   # noqa: E731
                    "=" + R.design_same[(p, op, t, n)][:16] if (p, op, t, n) in R.design_same else "-")
                lines.append(f"{p:<6} {op:<19} {t:>6} " + " ".join(f"{cell(n):>17}" for n in names)
                             + f" {f(tkt):>12} {best:>15} {(f'{two / timed[best]:.2f}' if two else '-'):>10} "
                             f"{(f'{tkt / timed[best]:.2f}' if tkt else '-'):>6}")
                recs.append(R.rec(op, "tilelang", "design:best", p, t, "best_design", None, best,
                                  best_us=timed[best], times_us=timed, tile_kernels_us=tkt,
                                  speedup_vs_two_pass=(two / timed[best]) if two else None,
                                  speedup_vs_tile_kernels=(tkt / timed[best]) if tkt else None,
                                  default_design=R.default_design))
                band = "T<=256" if t <= GRAPH_MAX_T else "T>=1024"
                votes.setdefault((op, band), {}).setdefault(best, 0)
                votes[(op, band)][best] += 1
    for (op, band), v in sorted(votes.items()):
        lines.append(f"recommendation {op:<19} {band:<8}: best design per (preset, T) counts {v}")
    R.design_lines = lines
    return recs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="folder for pr43905_mhc_direct.jsonl (and peaks.jsonl)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds from the start; the rest is skipped")
    ap.add_argument("--tokens", type=int, nargs="*", default=None, help="override the timing T list")
    ap.add_argument("--presets", nargs="*", default=list(PRESETS))
    ap.add_argument("--designs", default=None,
                    help=f"comma list restricting the design sweep (and its warm-up / smoke / numerics) to these of "
                         f"{', '.join(VARIANTS)}, tile_kernels; default: all. The launcher default "
                         f"({DEFAULT_VARIANT}) gets its numerics and graph checks in any case")
    ap.add_argument("--warm-job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-warm", action="store_true", help="skip the parallel warm-up (compile in-process)")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="exercise the plumbing on a CPU: the reference stands in for TileLang, tiny T")
    args = ap.parse_args(argv)
    os.environ.setdefault("TILELANG_CACHE_DIR", TL_CACHE)
    if args.warm_job:
        print(json.dumps(run_warm_job(args.warm_job)))
        return 0
    if not args.out:
        ap.error("--out is required")
    try:
        sweep_variants, want_tk = parse_designs(args.designs)
    except ValueError as e:
        ap.error(str(e))
    restricted = args.designs is not None

    import torch
    from tqdm import tqdm

    from dsv4lab.lab import results, roofline
    from dsv4lab.refactors import pr43905_mhc_direct as refactor

    dry = args.cpu_dry_run
    strict_fp32()
    if not dry and not torch.cuda.is_available():
        print("needs a CUDA GPU (torch.cuda.is_available() is False); use --cpu-dry-run to test the plumbing")
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    R = Runner(out, args.budget, "cpu" if dry else "cuda")
    print(f"{refactor.TITLE}\n{results.provenance()['gpu']} | torch {torch.__version__} | "
          f"tilelang {results.provenance()['tilelang']} | records -> {R.path}")
    if dry:   # kernels -> torch emulations (tests/_mhc_emulation.py): exercises launchers and plumbing on a CPU
        sys.path.insert(0, str(REPO / "tests"))
        from _mhc_emulation import install

        install(setattr)
    call_tl = tilelang_call
    if R.default_design != DEFAULT_VARIANT:
        print(f"WARNING: the launchers' TUNING is {R.default_design!r}, not DEFAULT_VARIANT {DEFAULT_VARIANT!r}")
    tokens = args.tokens or ([1, 4] if dry else TOKENS)
    torch_tokens = [1] if dry else TORCH_TOKENS
    tk_tokens = TK_TOKENS
    numerics_tokens = [1, 3] if dry else NUMERICS_TOKENS
    design_numerics_tokens = [1, 70] if dry else DESIGN_NUMERICS_TOKENS
    variant_tokens = [1, 70] if dry else VARIANT_TOKENS

    # ---- 0. peaks, warm-up, kernel loads ---------------------------------------------------------------
    peaks = None
    if not dry:
        try:
            peaks = roofline.load_peaks() or roofline.measure_peaks()
            if peaks.source == "measured":
                results.append(out / "peaks.jsonl", peaks.to_records())
            print(peaks.summary(), f"({peaks.source})")
        except Exception as e:
            R.save([R.rec("-", "-", "peaks", None, None, "error", None, None, message=f"{type(e).__name__}: {e}")])
    available = {op: True for op in OPS}
    design_ok = {(op, v): True for op in DESIGN_OPS for v in SMOKED_VARIANTS   # (op, variant): smoke passed
                 if v in sweep_variants and (v not in OVERLAP_VARIANTS or op in OVERLAP_OPS)}
    kinds = warm_kinds(sweep_variants, restricted)
    if not dry:
        if not args.no_warm:
            jobs = warm_jobs(kinds, args.presets, tile_kernels=want_tk, torch_compile=not restricted)
            t0 = time.perf_counter()
            try:
                warm = launch_warm_jobs(jobs, timeout=min(80.0, R.left() - 40))
            except Exception as e:   # the kernels then compile in-process below (slower, still correct)
                warm = {j: {"error": f"could not launch warm-up: {type(e).__name__}: {e}"} for j in jobs}
            print(f"warm-up: {len(jobs)} jobs in {time.perf_counter() - t0:.1f} s")
            for j, w in warm.items():
                R.save([R.rec(j, j.split(":")[0], "warm_job", None, None, "startup" if "seconds" in w else "error",
                              "s" if "seconds" in w else None, w.get("seconds"), message=w.get("error"))])
                if "error" in w:
                    print(f"  warm {j}: {w['error']}")
        for p in args.presets:
            for kind in kinds:
                t0 = time.perf_counter()
                try:
                    tl_kernel(p, kind)
                    R.save([R.rec(kind, "tilelang", "load", p, None, "startup", "s", time.perf_counter() - t0)])
                except Exception as e:
                    msg = f"{type(e).__name__}: {str(e)[:500]}"
                    print(f"  TileLang {kind} ({p}) FAILED: {msg}")
                    R.save([R.rec(kind, "tilelang", "load", p, None, "error", None, None, message=msg)])
                    for op, ks in DEFAULT_KERNELS.items():
                        if kind in ks:
                            available[op] = False
                    for v in OVERLAP_KERNELS.get(kind, ()):
                        for op in OVERLAP_OPS:
                            if (op, v) in design_ok:
                                design_ok[(op, v)] = False
                    if kind in VARIANT_KERNELS:   # onepass_pre -> mhc_pre, ...
                        op = {"pre": "mhc_pre", "fused": "mhc_fused_post_pre", "head": "hc_head"}[kind.split("_")[1]]
                        for v in SMOKED_VARIANTS:
                            if VARIANTS[v]["design"] == "one_pass" and (op, v) in design_ok:
                                design_ok[(op, v)] = False
        # each op once in its own process first (T up to 4096): an illegal access or a hang there marks
        # the op unavailable instead of killing this process's CUDA context (and every later measurement)
        smoke_jobs = [f"smoke:{op}:{','.join(args.presets)}" for op in OPS if available[op]]
        # the new designs too, each op in its own process (a cluster launch that faults or hangs stays there)
        smoke_jobs += [f"smoke:{op}:{','.join(args.presets)}:{d}" for (op, d), ok in design_ok.items()
                       if ok and available[op]]
        try:
            # 60 s whatever the budget: ~20 processes start torch at once, and a timed-out smoke disables a design
            smoke = launch_warm_jobs(smoke_jobs, timeout=60.0)
        except Exception as e:
            smoke = {j: {"error": f"could not launch: {type(e).__name__}: {e}"} for j in smoke_jobs}
        for j, w in smoke.items():
            op, design = j.split(":")[1], (j.split(":")[3:] or [R.default_design])[0]
            errs = w.get("max_rel_err", {})
            R.save([R.rec(op, "tilelang", "smoke_subprocess", None, None, "smoke_max_rel_err" if "error" not in w
                          else "error", "1" if "error" not in w else None,
                          max(errs.values()) if errs else None, per_output=errs, message=w.get("error"),
                          design=design)])
            print(f"  smoke {op} [{design}]: " + (f"max rel err per output {errs}" if "error" not in w
                                                 else f"FAILED {w['error']}"))
            bad = "error" in w or any(v != v or v == float("inf") for v in errs.values())
            if len(j.split(":")) > 3 and (bad or any(v > DESIGN_SMOKE_MAX_REL for v in errs.values())):
                design_ok[(op, design)] = False
            elif bad:
                available[op] = False
        for (op, d) in design_ok:
            design_ok[(op, d)] = design_ok[(op, d)] and available[op]
    for op in DESIGN_OPS:   # the default was smoke-tested as the op itself
        design_ok[(op, DEFAULT_VARIANT)] = available[op]
    print(f"kernels ready after {time.perf_counter() - R.t_start:.1f} s; available: {available}; "
          f"designs usable: {design_ok}")
    tk, tk_error = None, None
    try:
        tk = TileKernelsPeer() if not dry and want_tk else None
        if tk:
            R.save([R.rec("-", "tile_kernels", "api", None, None, "tk_semantics", None, tk.api, notes=tk.notes + [
                "pre: no RMSNorm weight on layer_input", "fused_post_pre: its post then its pre (two calls)",
                "hc_head: fn padded to 24 rows"])])
    except Exception as e:
        tk_error = f"{type(e).__name__}: {e}"
        R.save([R.rec(op, "tile_kernels", "-", None, None, "unavailable", None, None, reason=tk_error) for op in OPS])
        print(f"tile_kernels unavailable: {tk_error}")
    strict_fp32()   # again: a peer library may have switched TF32 on at import
    tk_ok = {}
    if tk:   # one smoke call per op: an API mismatch is recorded once, not at every T
        for op in OPS:
            tk_ok[op] = bool(R.guarded(f"tile_kernels smoke {op}", lambda op=op: [R.rec(
                op, "tile_kernels", "smoke", "flash", 4, "smoke_ok", "bool", tk.call(op, make_case(
                    "flash", 4, R.dev)) is not None)], op=op, backend="tile_kernels")[0].get("value"))
        print(f"tile_kernels ops usable: {tk_ok}")

    # ---- 1a. the launcher default FIRST (the budget cuts the tail): numerics, then eager/graph bitwise ----------
    from dsv4lab.config import get_config

    impl_tl = lambda op, c: call_tl(op, c)   # noqa: E731
    for p in args.presets:
        for op in OPS:
            if not available[op]:
                continue
            for t in numerics_tokens:
                R.guarded(f"numerics {op} {p} T={t}", lambda op=op, t=t, p=p: numerics_case(
                    R, p, op, t, impl_tl, "tilelang" if not dry else "tilelang(emulated)"),
                    op=op, preset=p, tokens=t, min_left=10)
            for t in (() if dry else DEFAULT_GRAPH_TOKENS):
                R.guarded(f"graph/determinism {op} {p} T={t}", lambda op=op, t=t, p=p: graph_and_determinism(
                    R, p, op, t), op=op, preset=p, tokens=t, min_left=10)
    R.guarded("T=0", lambda: empty_tokens(R, "flash"), preset="flash", tokens=0, min_left=10)

    # ---- 1b. the designs timed against each other (and tile_kernels), before the long sweeps -------------------
    for t in variant_tokens:
        for p in args.presets:
            R.guarded(f"design sweep {p} T={t}", lambda t=t, p=p: design_sweep(R, p, t, peaks, design_ok, tk,
                                                                              tk_ok, sweep_variants),
                      preset=p, tokens=t, min_left=15)
    R.save(design_summary(R, args.presets, variant_tokens, sweep_variants))

    # ---- 1c. numerics + eager/graph bitwise of the other variants (where the smoke passed) --------------------
    numerics_seen: dict[tuple, str] = {}
    for p in args.presets:
        for (op, design), ok in design_ok.items():
            if design not in NUMERICS_VARIANTS:
                continue
            if not ok:
                R.save([R.rec(op, "tilelang", f"design:{design}", p, None, "unavailable", None, None, design=design,
                              reason="failed to compile/load or its subprocess smoke test")])
                continue
            n_mix = 4 if op == "hc_head" else 24
            for t in design_numerics_tokens:
                with tuning(**VARIANTS[design]):
                    key = (op, p, t, launch_key(get_config(p).hidden_size, t, n_mix))
                if key in numerics_seen:   # the same launches as a variant already checked at this T
                    R.save([R.rec(op, "tilelang", f"design:{design}", p, t, "same_as", None, numerics_seen[key],
                                  design=design, what="numerics")])
                    continue
                numerics_seen[key] = design
                def case(op=op, t=t, p=p, design=design):
                    with tuning(**VARIANTS[design]):
                        return numerics_case(R, p, op, t, tilelang_call,
                                             "tilelang" if not dry else "tilelang(emulated)", design=design)
                R.guarded(f"numerics {op} [{design}] {p} T={t}", case, op=op, preset=p, tokens=t, min_left=20)
            for t in (() if dry else (1, 1000) if design in NEW_DESIGNS else (1, 70)):
                with tuning(**VARIANTS[design]):
                    key = ("graph", op, p, t, launch_key(get_config(p).hidden_size, t, n_mix))
                if key in numerics_seen:
                    continue
                numerics_seen[key] = design
                def bitwise(op=op, t=t, p=p, design=design):
                    with tuning(**VARIANTS[design]):
                        return graph_and_determinism(R, p, op, t, design)
                R.guarded(f"graph/determinism {op} [{design}] {p} T={t}", bitwise, op=op, preset=p, tokens=t,
                          min_left=20)

    # ---- 2. stage diagnostics, tile_kernels' numerics --------------------------------------------------
    for t in ((3, 70) if dry else (3, 1000)):
        R.guarded(f"stage diagnostics T={t}", lambda t=t: stage_diagnostics(R, "flash", t), preset="flash",
                  tokens=t, min_left=60)
    for p in args.presets:
        for op in OPS:
            for t in (3, 1000):
                if tk and tk_ok.get(op):
                    R.guarded(f"numerics tile_kernels {op} {p} T={t}", lambda op=op, t=t, p=p: numerics_case(
                        R, p, op, t, lambda o, c: tk.call(o, c), "tile_kernels", norm=op == "hc_head",
                        semantics="tile_kernels: no norm weight" if op != "hc_head" else "dsv4"),
                        op=op, backend="tile_kernels", preset=p, tokens=t, min_left=55)

    # ---- 3. the refactor on the GPU (before the long timing sweep) -----------------------------------------
    R.guarded("refactor run", lambda: refactor.run("cpu" if dry else "cuda", quick=True, preset="flash"),
              op="refactor", backend="mixed", min_left=30)

    # ---- 4. timing: three passes, most important first (the budget cuts the tail) -----------------------------
    order = sorted(tokens, key=lambda t: (t < 1024, -t if t >= 1024 else t))   # targets (T >= 1024) first
    # pass A: TileLang (eager with L2 flush; graph replay at small T) and tile_kernels, both presets per T
    for t in tqdm(order, desc="timing TileLang / tile_kernels", disable=dry):
        for p in args.presets:
            c = make_case(p, t, R.dev, seed=t)
            for op in OPS:
                if available[op]:
                    R.guarded(f"time tilelang {op} {p} T={t}", lambda: time_case(
                        R, p, op, t, "tilelang", lambda: tilelang_call(op, c), peaks, False,
                        design=R.default_design), op=op, preset=p, tokens=t, min_left=5)
                    if op in ("mhc_pre", "mhc_fused_post_pre") and t >= 1024:
                        R.guarded(f"time tilelang {op} nonorm {p} T={t}", lambda: time_case(
                            R, p, op, t, "tilelang", lambda: tilelang_call(op, c, norm=False), peaks, False,
                            norm_weight=False, design=R.default_design), op=op, preset=p, tokens=t, min_left=5)
                    if t <= GRAPH_MAX_T and not dry:
                        R.guarded(f"graph tilelang {op} {p} T={t}", lambda: time_case(
                            R, p, op, t, "tilelang", lambda: tilelang_call(op, c), peaks, True,
                            design=R.default_design), op=op, preset=p, tokens=t, min_left=5)
                if tk and tk_ok.get(op) and t in tk_tokens:
                    R.guarded(f"time tile_kernels {op} {p} T={t}", lambda: time_case(
                        R, p, op, t, "tile_kernels", lambda: tk.call(op, c), peaks, False,
                        norm_weight=op == "hc_head"), op=op, backend="tile_kernels", preset=p, tokens=t, min_left=5)
                    if t <= GRAPH_MAX_T and not dry:
                        R.guarded(f"graph tile_kernels {op} {p} T={t}", lambda: time_case(
                            R, p, op, t, "tile_kernels", lambda: tk.call(op, c), peaks, True,
                            norm_weight=op == "hc_head"), op=op, backend="tile_kernels", preset=p, tokens=t,
                            min_left=5)
            del c
    # pass B: torch eager reference; pass C: torch.compile(dynamic=True) of it (compiles first: warm-up cached it)
    compiled: dict[str, Any] = {}
    for backend in ("torch",) + (() if dry else ("torch.compile",)):
        for t in [t for t in order if t in torch_tokens]:
            for p in args.presets:
                c = make_case(p, t, R.dev, seed=t)
                for op in OPS:
                    def fn(op=op, c=c, backend=backend):
                        if backend == "torch":
                            return reference_call(None, op, c)
                        return reference_call(compiled.setdefault(op, compiled_reference(op)), op, c)
                    R.guarded(f"time {backend} {op} {p} T={t}", lambda: time_case(
                        R, p, op, t, backend, fn, peaks, False, what=(
                            "eager fp32 reference" if backend == "torch"
                            else "torch.compile(dynamic=True) of the reference")),
                        op=op, backend=backend, preset=p, tokens=t,
                        min_left=5 if backend == "torch" else 30)   # a cold torch.compile can take tens of s
                del c
        if not dry:
            torch.cuda.empty_cache()
    ratio_recs = []
    for (p, op, t, backend, variant, norm), us in R.times.items():
        peer = R.times.get((p, op, t, "tile_kernels", variant, op == "hc_head"))
        if backend == "tilelang" and peer and (norm or op in ("mhc_post", "hc_head")):
            ratio_recs.append(R.rec(op, "tilelang", variant, p, t, "speedup_vs_tile_kernels", "x", peer / us,
                                    norm_weight=norm, target=0.9 if t >= 1024 else None))
    R.save(ratio_recs)
    if tk:   # notes gathered while running (e.g. a DeepGEMM fallback)
        R.save([R.rec("-", "tile_kernels", "api_final", None, None, "tk_semantics", None, tk.api, notes=tk.notes)])
        print("tile_kernels notes:", "; ".join(tk.notes))

    # ---- summary -----------------------------------------------------------------------------------------------
    print("\n".join(R.summary))
    print(f"\n{'preset':<6} {'op':<19} {'T':>6} {'tilelang us':>12} {'%HBM':>6} {'tile_k us':>10} {'x tk':>6} "
          f"{'graph us':>9} {'torch us':>9} {'compile us':>10}")
    recs = results.read_records(R.path, strict=False) if R.path.exists() else []
    pct = {(r["preset"], r["op"], r["tokens"]): r.get("pct_of_peak") for r in recs
           if r.get("metric") == "time" and r["backend"] == "tilelang" and r["variant"] == "eager"
           and r.get("norm_weight", True)}
    for p in args.presets:
        for op in OPS:
            for t in tokens:
                g = lambda b, v="eager", nw=True: R.times.get((p, op, t, b, v, nw))   # noqa: E731
                tl, tkt = g("tilelang"), g("tile_kernels", nw=op == "hc_head")
                f = lambda x: f"{x:.1f}" if x else "-"   # noqa: E731
                pc = pct.get((p, op, t))
                print(f"{p:<6} {op:<19} {t:>6} {f(tl):>12} {f(pc):>6} {f(tkt):>10} "
                      f"{(f'{tkt / tl:.2f}' if tl and tkt else '-'):>6} {f(g('tilelang', 'graph')):>9} "
                      f"{f(g('torch')):>9} {f(g('torch.compile')):>10}")
    print("\n".join(R.design_lines))
    errors = [r for r in recs if r.get("metric") == "error"]
    print(f"\n{len(recs)} records, {len(errors)} errors, {time.perf_counter() - R.t_start:.0f} s total -> {R.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

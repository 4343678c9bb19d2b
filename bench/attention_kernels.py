"""H100 benchmark of the fused DSv4 attention kernels (issue 12): sparse attention with sink, compressor, indexer.

    python bench/attention_kernels.py --out $OUT          # records -> $OUT/attention_kernels.jsonl
    python bench/attention_kernels.py --out /tmp/x --cpu-dry-run   # logic check on a CPU (interpreter, tiny shapes)

Order (each case recorded as it finishes; a failure becomes an "error" record and the run goes on; the time budget
--budget cuts what is left, recorded as "unavailable"):
0. Smoke: every op once on small Flash-like shapes in a subprocess (a crash / illegal memory access marks that op
   "crashed" and the rest is retried in a fresh subprocess); this also fills the Triton / DeepGEMM JIT caches.
1. Numerics, Flash shapes (H=64, d=512, W=128, K_I=512), T in {1024, 4096}: Triton attention vs the fp32
   reference vs a float64 oracle on sampled rows (window, CSA with per-query random top-k sets, HCA); edge cases
   (empty rows, -inf sink, huge sink); FlexAttention on the same sets; compressor (r=4, 128, fp8 nope) vs the
   reference; DeepGEMM indexer top-k overlap with the reference (near ties explained by the reference logits).
2. Timing (CUDA events, L2 flushed; sparse-attention decode as CUDA-graph replays): prefill T in {1024, 4096, 8192,
   16384} for window/CSA/HCA (TFLOP/s and % of the measured bf16 matmul peak; target >= 40 % at T=8192), then every
   sparse_attention CONFIGS entry at T=8192 (variant prefill-sweep-<kind>, field config) and at DECODE_SWEEP shapes
   with split counts (variant decode-sweep-*), each capped at ATTN_SWEEP_S; decode with the default config, batch
   {1, 16, 64, 256} x L {4096, 32768, 131072} (GB/s of the bf16 rows actually read, pct_bw_actual; target >= 50 %;
   pct_of_peak counts the roofline row's fp8 584 B/row); compressor (every config of both designs, "channels" and
   "tiles", eager and CUDA-graph, numerics of each vs the reference, a same-bytes copy and a read-flushed default
   as references; capped at COMP_SWEEP_S) and indexer Q (GB/s; target >= 70 % at T >= 4096); DeepGEMM logits +
   top-k; FlexAttention at T in {4096, 8192} (target: Triton faster).
   TileLang sparse attention prefill at T=8192 (CSA, HCA), every TL_VARIANTS design (v1, warp-specialised ws and
   its persistent form wsp; variant prefill-sweep-<kind>-tilelang, field config), numerics vs Triton and the oracle,
   capped at TL_SWEEP_S.
Peaks: data/results/<gpu>/peaks.jsonl if present, else measured here and written to <out>/peaks.jsonl.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# time the kernels, not the launchers' index range checks (each a device sync + an aminmax over idx); the records
# of 2026-11-23 (commits 2ae86ce, 7cf721b) were taken with the checks on
os.environ.setdefault("DSV4LAB_GPU_RANGE_CHECKS", "0")

EXPERIMENT = "attention_kernels"
H, D_HEAD, W, K_I, HIDDEN, Q_LORA, N_I, D_I = 64, 512, 128, 512, 4096, 1024, 64, 128
SMOKE_OPS = ["sparse_attention_prefill", "sparse_attention_decode", "compressor", "indexer_q", "indexer_deep_gemm",
             "flex"]


# ---- inputs -----------------------------------------------------------------------------------------
def attention_inputs(T: int, kind: str, dev: str, seed: int = 0):
    """q [T, H, d] (unit-RMS heads), kv [T + n, d] (window rows then compressed entries), idx [T, W + *] int32."""
    import torch

    from dsv4lab.kernels.reference.attention import causal_entry_indices, window_indices

    g = torch.Generator(device=dev).manual_seed(seed)
    r = {"window": 0, "csa": 4, "hca": 128}[kind]
    n = T // r if r else 0
    q = torch.randn(T, H, D_HEAD, device=dev, generator=g).to(torch.bfloat16)
    kv = torch.randn(T + n, D_HEAD, device=dev, generator=g).to(torch.bfloat16)
    lists = [window_indices(T, W, dev)]
    if kind == "hca":
        sel = causal_entry_indices(T, 128, dev)
        lists.append(torch.where(sel >= 0, sel + T, -1))
    elif kind == "csa":
        n_valid = (torch.arange(T, device=dev) + 1) // 4
        score = torch.rand(T, n, device=dev, generator=g)
        score.masked_fill_(torch.arange(n, device=dev)[None, :] >= n_valid[:, None], -1.0)
        k = min(K_I, n)
        sel = score.topk(k, dim=1).indices
        sel = torch.where(torch.arange(k, device=dev)[None, :] < n_valid[:, None], sel, -1)
        lists.append(torch.where(sel >= 0, sel + T, -1))
    idx = torch.cat(lists, 1).to(torch.int32).contiguous()
    sink = 0.5 * torch.randn(H, device=dev, generator=g)
    return q, kv, idx, sink, r


def decode_inputs(B: int, L: int, kind: str, dev: str, seed: int = 0):
    """B query tokens, each with its own W window rows + its compressed candidates, all distinct rows of one pool
    (so nothing is shared between tokens, as with B independent sequences)."""
    import torch

    cand = {"window": 0, "hca": L // 128, "csa": min(K_I, L // 4)}[kind]
    m = min(W, L) + cand
    g = torch.Generator(device=dev).manual_seed(seed)
    kv = torch.randn(B * m, D_HEAD, device=dev, generator=g).to(torch.bfloat16)
    idx = torch.randperm(B * m, device=dev, generator=g).view(B, m).to(torch.int32).contiguous()
    q = torch.randn(B, H, D_HEAD, device=dev, generator=g).to(torch.bfloat16)
    sink = 0.5 * torch.randn(H, device=dev, generator=g)
    return q, kv, idx, sink, {"window": 0, "hca": 128, "csa": 4}[kind]


def oracle_rows(q, kv, idx, sink, scale, rows):
    """float64 attention with sink for the given rows (gathered, masked)."""
    import torch

    qi, ii = q[rows].double(), idx[rows].long()
    keys = kv.double()[ii.clamp(min=0)]                                 # [R, M, d]
    lg = torch.einsum("rhd,rmd->rhm", qi, keys) * scale
    lg = lg.masked_fill((ii < 0)[:, None, :], float("-inf"))
    s = sink.double().view(1, -1, 1).expand(len(rows), -1, 1)
    m = torch.cat([lg, s], -1).amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(lg - m)
    den = p.sum(-1, keepdim=True) + torch.exp(s - m)
    o = torch.einsum("rhm,rmd->rhd", p, keys)
    return torch.where(den > 0, o / den, torch.zeros_like(o))


def compressor_inputs(T: int, r: int, dev: str, seed: int = 0, hd: int = D_HEAD, D: int = HIDDEN):
    import torch

    g = torch.Generator(device=dev).manual_seed(seed)
    c = 2 if r == 4 else 1
    x = torch.randn(T, D, device=dev, generator=g).to(torch.bfloat16)
    wkv = (torch.randn(c * hd, D, device=dev, generator=g) * D ** -0.5).to(torch.bfloat16)
    wg = (torch.randn(c * hd, D, device=dev, generator=g) * D ** -0.5).to(torch.bfloat16)
    ape = 0.1 * torch.randn(r, c * hd, device=dev, generator=g)
    nw = (1 + 0.05 * torch.randn(hd, device=dev, generator=g)).to(torch.bfloat16)
    return x, wkv, wg, ape, nw


def indexer_inputs(T: int, dev: str, seed: int = 0):
    import torch

    from dsv4lab.kernels.reference.norms import rmsnorm

    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(T, HIDDEN, device=dev, generator=g).to(torch.bfloat16)
    qr = rmsnorm(torch.randn(T, Q_LORA, device=dev, generator=g).to(torch.bfloat16), None, 1e-6)
    wq_b = (torch.randn(N_I * D_I, Q_LORA, device=dev, generator=g) * Q_LORA ** -0.5).to(torch.bfloat16)
    wp = (torch.randn(N_I, HIDDEN, device=dev, generator=g) * HIDDEN ** -0.5).to(torch.bfloat16)
    x_c, wkv, wg, ape, nw = compressor_inputs(T, 4, dev, seed + 1, hd=D_I)
    return x, qr, wq_b, wp, wkv, wg, ape, nw


def inv_freq(dev: str):
    from dsv4lab import get_config
    from dsv4lab.rope import layer_inv_freq

    return layer_inv_freq(get_config("flash"), 2).to(dev)        # a CSA layer: theta 160000 + YaRN


# ---- sparse attention launch configs (kernel table: dsv4lab/kernels/triton/sparse_attention.py CONFIGS) -----------
COMP_SWEEP_S = 40.0             # wall-clock cap of the compressor phase (all shapes, configs, references)
ATTN_SWEEP_S = 45.0             # wall-clock cap of the prefill sweep and of the decode sweep (each)
# decode sweep shapes (kind, L, batch, split counts also tried with the decode default config)
DECODE_SWEEP = [("csa", 32768, 1, [1, 2, 4, 8, 16]), ("csa", 32768, 16, [1, 2, 4, 8]), ("csa", 32768, 64, [1, 2, 4]),
                ("csa", 32768, 256, []), ("hca", 131072, 64, []), ("window", 4096, 256, [])]
DECODE_SWEEP_DRY = [("csa", 512, 1, [1, 3]), ("hca", 512, 2, [])]


def attn_sweep_cases(SA, regime: str, dry: bool) -> list[tuple[str, dict]]:
    """(name, launch knobs): every CONFIGS entry, plus the regime's default with its trailing-run trim flipped."""
    cases = [(name, dict(cfg)) for name, cfg in SA.CONFIGS.items()]
    # the default config with the opposite of the regime's default trim setting
    flip = not SA.TRIM_DEFAULT[regime]
    cases.append((SA.DEFAULTS[regime] + ("-trim" if flip else "-notrim"), dict(SA.CONFIGS[SA.DEFAULTS[regime]], trim=flip)))
    return cases[:2] if dry else cases


def attn_config_fields(SA, q, idx, name: str | None = None, knobs: dict | None = None) -> dict:
    """Record fields naming the launch config actually run (splits resolved as the launcher does)."""
    T, Hq, d = q.shape
    regime = "decode" if T <= SA._DECODE_MAX_TOKENS else "prefill"
    sms = SA._sm_count(q.device.index if q.device.type == "cuda" else None)
    res = SA.resolve_config(T, Hq, idx.shape[1], d, sms, **(knobs or {}))
    splits, _ = SA.split_layout(idx.shape[1], res["block_n"], res["num_splits"])
    return {"config": name or SA.DEFAULTS[regime], "is_default": name is None or name == SA.DEFAULTS[regime],
            "regime": regime, "knobs": json.dumps(res, sort_keys=True), "num_splits": splits}


# ---- smoke (subprocess) -----------------------------------------------------------------------------
def smoke_one(op: str, dev: str) -> str:
    import torch

    from dsv4lab.kernels.triton import sparse_attention as SA

    T = 64 if dev == "cpu" else 1024
    if op == "sparse_attention_prefill":
        q, kv, idx, sink, _ = attention_inputs(T, "csa", dev)
        o = SA.sparse_attention_with_sink(q, kv, idx, sink, D_HEAD ** -0.5)
    elif op == "sparse_attention_decode":
        q, kv, idx, sink, _ = decode_inputs(2, 4096, "hca", dev)
        o = SA.sparse_attention_launch(q, kv, idx, sink, D_HEAD ** -0.5, num_splits=4)
    elif op == "compressor":
        from dsv4lab.kernels.triton.compressor import compress
        for r in (4, 128):
            x, wkv, wg, ape, nw = compressor_inputs(max(T, 256), r, dev)
            o = compress(x, wkv, wg, ape, nw, r, inv_freq(dev), head_dim=D_HEAD, fp8_nope=True)
    elif op == "indexer_q":
        from dsv4lab.kernels.triton.indexer_q import indexer_q_rope_quant
        q = torch.randn(T, N_I, D_I, device=dev).to(torch.bfloat16)
        o, _ = indexer_q_rope_quant(q, torch.arange(T, device=dev), inv_freq(dev), torch.randn(T, N_I, device=dev))
        o = o.float()
    elif op == "indexer_deep_gemm":
        if dev == "cpu":
            return "skipped on CPU"
        from dsv4lab.kernels.deep_gemm.indexer import indexer_topk
        x, qr, wq_b, wp, wkv, wg, ape, nw = indexer_inputs(T, dev)
        o, _ = indexer_topk(x, qr, torch.arange(T, device=dev), wq_b, wp, wkv, wg, ape, nw, inv_freq(dev), K_I)
        o = o.float()
    elif op == "flex":
        if dev == "cpu":
            return "skipped on CPU"
        from dsv4lab.kernels.torch.flex_attention import sparse_attention_flex
        q, kv, idx, sink, _ = attention_inputs(T, "hca", dev)
        o = sparse_attention_flex(q, kv, idx, sink, D_HEAD ** -0.5)
    else:
        raise ValueError(op)
    if dev == "cuda":
        torch.cuda.synchronize()
    return f"finite={bool(torch.isfinite(o.float()).all())}"


def smoke_child(ops: list[str], dev: str) -> int:
    for op in ops:
        print(f"SMOKE-START {op}", flush=True)
        try:
            msg = smoke_one(op, dev)
            print(f"SMOKE-OK {op} {msg}", flush=True)
        except Exception as e:  # a Python error: report and go on (a hard crash ends the process)
            print(f"SMOKE-FAIL {op} {type(e).__name__}: {str(e)[:300]}", flush=True)
    return 0


def run_smoke(dev: str, timeout: float) -> dict[str, str]:
    """op -> 'ok' | 'fail: ...' | 'crashed: ...'; ops after a crash are retried in a fresh process."""
    status: dict[str, str] = {}
    remaining = list(SMOKE_OPS)
    t_end = time.perf_counter() + timeout
    while remaining and time.perf_counter() < t_end:
        cmd = [sys.executable, __file__, "--smoke-child", ",".join(remaining), "--out", "-"]
        if dev == "cpu":
            cmd.append("--cpu-dry-run")
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=max(5.0, t_end - time.perf_counter()))
            out, rc = res.stdout, res.returncode
            tail = (res.stderr or "")[-400:]
        except subprocess.TimeoutExpired as e:
            out, rc, tail = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), -9, "timeout"
        started = None
        for line in out.splitlines():
            parts = line.split(" ", 2)
            if parts[0] == "SMOKE-START":
                started = parts[1]
            elif parts[0] == "SMOKE-OK":
                status[parts[1]] = "ok" + (f" ({parts[2]})" if len(parts) > 2 else "")
                started = None
            elif parts[0] == "SMOKE-FAIL":
                status[parts[1]] = "fail: " + (parts[2] if len(parts) > 2 else "")
                started = None
        if started is not None:
            status[started] = f"crashed (rc={rc}): {tail.strip()[-300:]}"
        remaining = [op for op in remaining if op not in status]
        if started is None and remaining:       # the child ended without starting them: give up on those
            for op in remaining:
                status[op] = f"not run (rc={rc}): {tail.strip()[-200:]}"
            remaining = []
    for op in remaining:
        status[op] = "not run: smoke time budget spent"
    return status


# ---- TileLang sparse attention prefill (dsv4lab/kernels/tilelang/sparse_attention.py) ------------------------
TL_PREFILL_T = 8192
TL_SWEEP_S = 55.0               # wall-clock cap of the whole TileLang phase (compiles included)
TL_COMPILE_TIMEOUT_S = 45.0     # per compile+smoke subprocess (they run concurrently); a hung kernel costs this much
# (config name, sparse_attention_launch knobs): every TileLang design at T = 8192; "v1" = the registry default
TL_VARIANTS = [
    ("tilelang-v1-n64s2", dict(design="v1")),
    ("tilelang-ws-n64s2", dict(design="ws", block_n=64, stages=2)),
    ("tilelang-ws-n64s2-notrim", dict(design="ws", block_n=64, stages=2, trim=False)),
    ("tilelang-ws-n32s4", dict(design="ws", block_n=32, stages=4)),
    ("tilelang-wsp-n64s2", dict(design="wsp", block_n=64, stages=2)),
]
_TL_CHILD = r"""
import sys, torch
sys.path[:0] = [{repo!r}, {bench!r}]
from attention_kernels import attention_inputs
from dsv4lab.kernels.tilelang import sparse_attention as TLSA
knobs = {knobs!r}
k = TLSA.resolve_design({d}, **knobs)
for kind in {kinds!r}:
    # the main process's exact inputs: a kernel that hangs or faults on them does it here, under a time limit
    q, kv, idx, sink, r = attention_inputs({t}, kind, "cuda", seed=1)
    M = idx.shape[1]
    print("TL-START", M, flush=True)
    TLSA.sparse_attention_kernel({h}, {d}, M, {scale!r}, block_n=k["block_n"], stages=k["stages"],
                                 design=k["design"])        # compile (fills TileLang's disk cache)
    o = TLSA.sparse_attention_launch(q, kv, idx, sink, {scale!r}, **knobs)
    torch.cuda.synchronize()
    print("TL-OK", M, bool(torch.isfinite(o.float()).all()), flush=True)
    del q, kv, idx, o
"""


def _tl_compile_all(kinds_m: dict, timeout: float) -> dict:
    """Compile + run every TL_VARIANTS kernel once on the sweep's own inputs ({kind: list length} ``kinds_m``), one
    subprocess per distinct kernel, all at once (a crash or hang there cannot touch this process; the main process
    only runs what finished there). Returns {name: (ok lengths, log tail)}."""
    from dsv4lab.kernels.tilelang import sparse_attention as TLSA

    def kernel_key(knobs):      # variants that differ only in the launcher's trim share one compiled kernel
        k = TLSA.resolve_design(D_HEAD, **knobs)
        return k["design"], k["block_n"], k["stages"]

    procs = {}
    for name, knobs in TL_VARIANTS:
        if kernel_key(knobs) in procs:
            continue
        code = _TL_CHILD.format(repo=str(REPO), bench=str(REPO / "bench"), kinds=sorted(kinds_m), t=TL_PREFILL_T,
                                h=H, d=D_HEAD, scale=D_HEAD ** -0.5, knobs=knobs)
        procs[kernel_key(knobs)] = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, text=True)
    t_end = time.perf_counter() + timeout
    done = {}
    for key, p in procs.items():
        try:
            out, err = p.communicate(timeout=max(1.0, t_end - time.perf_counter()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err = (err or "") + " timeout (compile or a hung kernel)"
        oks = {m for m in set(kinds_m.values()) if f"TL-OK {m} True" in (out or "")}
        done[key] = (oks, f"{(out or '')[-300:]} {(err or '')[-600:]}")
    return {name: done[kernel_key(knobs)] for name, knobs in TL_VARIANTS}


def tilelang_prefill_cases(dev, dry, left, rec, error, skip, time_attn, summary, numerics, roofline, SA):
    """TileLang backend of sparse_attention at T = 8192, CSA and HCA, every TL_VARIANTS design (variant
    prefill-sweep-<kind>-tilelang, field config): compile + a small launch per design in concurrent subprocesses
    first, then per design numerics vs the Triton output (whole tensor, max_abs_vs_triton) and vs the float64 oracle
    on sampled rows, and time (same roofline cost as the Triton rows; ``kernel_only_p50_us``: the compiled kernel
    without the launcher's per-token chunk count). Capped at TL_SWEEP_S."""
    import torch

    from dsv4lab.kernels import registry
    from dsv4lab.kernels.tilelang import sparse_attention as TLSA

    kinds = ("csa", "hca")
    t0 = time.perf_counter()
    ok, why = registry.availability("sparse_attention", "tilelang")
    if dry or not ok or left() < 45:
        reason = "CPU dry run" if dry else (why if not ok else "budget")
        for kind in kinds:
            for name, _ in TL_VARIANTS:
                skip("sparse_attention", f"prefill-sweep-{kind}-tilelang", TL_PREFILL_T, reason)
        if dry:     # the launch knobs of every variant must at least resolve
            for name, knobs in TL_VARIANTS:
                TLSA.resolve_design(D_HEAD, **knobs)
        return
    T, scale = TL_PREFILL_T, D_HEAD ** -0.5
    n_cand = {"csa": W + min(K_I, T // 4), "hca": W + T // 128}
    compiled = _tl_compile_all(n_cand, min(TL_COMPILE_TIMEOUT_S, max(10.0, left() - 40)))
    for kind in kinds:
        variant = f"prefill-sweep-{kind}-tilelang"
        try:
            q, kv, idx, sink, r = attention_inputs(T, kind, dev, seed=1)        # the Triton prefill rows' inputs
            cost = roofline.cost("sparse_attention_prefill", T=T, H=H, r=r, d=D_HEAD, W=W, K_I=K_I if r == 4 else None)
            o_tri = SA.sparse_attention_with_sink(q, kv, idx, sink, scale)
            rows = torch.linspace(0, T - 1, 16, device=dev).long()
            o64 = oracle_rows(q, kv, idx, sink, scale, rows)
        except Exception as e:
            error("sparse_attention", variant, T, e)
            continue
        for name, knobs in TL_VARIANTS:
            oks, log = compiled[name]
            if n_cand[kind] not in oks:
                error("sparse_attention", variant, T, RuntimeError(f"{name}: compile/smoke subprocess: {log}"))
                continue
            if left() < 40 or time.perf_counter() - t0 > TL_SWEEP_S:
                skip("sparse_attention", variant, T, f"budget ({name})")
                continue
            try:
                fields = dict(config=name, knobs=json.dumps(TLSA.resolve_design(D_HEAD, **knobs), sort_keys=True),
                              is_default=knobs.get("design") == TLSA.DEFAULT_DESIGN and knobs.get("trim", True))
                o_tl = TLSA.sparse_attention_launch(q, kv, idx, sink, scale, **knobs)
                c = numerics.compare(o64, o_tri[rows], o_tl[rows])
                vs_tri = float((o_tl.float() - o_tri.float()).abs().max())
                nonfinite = int((~torch.isfinite(o_tl.float())).sum())
                rec("sparse_attention", "tilelang", variant, T, "max_abs_vs_triton", "1", vs_tri, nonfinite=nonfinite,
                    oracle_max_abs=c.max_abs, triton_oracle_max_abs=c.eager_max_abs, err_ratio_vs_triton=c.err_ratio,
                    oracle_passed=c.passed, rows_sampled=16, **fields)
                k = TLSA.resolve_design(D_HEAD, **knobs)
                if k["trim"]:
                    chunks = TLSA.chunks_per_token(idx, kv.shape[0], k["block_n"])
                else:
                    chunks = torch.full((T,), -(-idx.shape[1] // k["block_n"]), dtype=torch.int32, device=dev)
                kern = TLSA.sparse_attention_kernel(H, D_HEAD, idx.shape[1], float(scale), block_n=k["block_n"],
                                                    stages=k["stages"], design=k["design"])
                o_buf = torch.empty_like(q)
                kargs = (q, kv, idx, sink, chunks, o_buf)
                if k["design"] == "wsp":        # the persistent kernel's CTA count operand
                    kargs += (torch.empty(TLSA.persistent_ctas(T * -(-H // TLSA.BLOCK_H), q.device),
                                          dtype=torch.int32, device=dev),)
                t_k = time_attn(T, kind, variant + "-kernel-only", lambda: kern(*kargs), cost, cost.bytes,
                                backend="tilelang", **fields)[0]
                t, rr = time_attn(T, kind, variant, functools.partial(TLSA.sparse_attention_launch, q, kv, idx, sink,
                                                                      scale, **knobs),
                                  cost, cost.bytes, backend="tilelang", max_abs_vs_triton=vs_tri,
                                  kernel_only_p50_us=t_k.p50, **fields)
                summary.append(f"  tilelang prefill {kind} T={T} {name:25s}: {t.p50:8.1f} us (kernel {t_k.p50:.1f}) "
                               f"{rr['tflops']:6.1f} TFLOP/s ({rr.get('pct_bf16_peak', float('nan')):.1f}%) "
                               f"max|tl-tri| {vs_tri:.3g} err_ratio {c.err_ratio} oracle_ok {c.passed} "
                               f"nonfinite {nonfinite}")
                del o_tl, o_buf
            except Exception as e:
                error("sparse_attention", variant, T, RuntimeError(f"{name}: {type(e).__name__}: {e}"))
        del q, kv, idx, o_tri
    print(f"  tilelang prefill phase: {time.perf_counter() - t0:.1f} s")


# ---- main -------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole script (smoke <= 90 s of it)")
    ap.add_argument("--cpu-dry-run", action="store_true")
    ap.add_argument("--smoke-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ops", default=None,
                    help="comma list of the ops to run (default: all of SMOKE_OPS); the others are skipped")
    args = ap.parse_args(argv)
    if args.ops:
        wanted = [o.strip() for o in args.ops.split(",") if o.strip()]
        unknown = sorted(set(wanted) - set(SMOKE_OPS))
        if unknown:
            ap.error(f"--ops: unknown {unknown}; expected a subset of {SMOKE_OPS}")
        SMOKE_OPS[:] = wanted
    t0 = time.perf_counter()
    dev = "cpu" if args.cpu_dry_run else "cuda"
    if dev == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if args.smoke_child is not None:
        return smoke_child(args.smoke_child.split(","), dev)

    import torch

    if dev == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-dry-run)")
        return 2
    from dsv4lab.lab import numerics, results, roofline, timing

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{EXPERIMENT}.jsonl"
    all_recs: list[dict] = []
    summary: list[str] = []
    deadline = t0 + args.budget
    dry = dev == "cpu"

    def left() -> float:
        return deadline - time.perf_counter()

    def rec(op, backend, variant, tokens, metric, unit, value, **extra):
        r = results.record(EXPERIMENT, op, backend, variant, "flash", tokens, extra.pop("dtype", "bfloat16"),
                           metric, unit, value, **extra)
        results.append(path, [r])
        all_recs.append(r)
        return r

    def error(op, variant, tokens, e):
        msg = f"{type(e).__name__}: {e}"[:1500]
        rec(op, "-", variant, tokens, "error", None, None, message=msg, trace=traceback.format_exc()[-1500:])
        print(f"  ERROR {op} {variant} T={tokens}: {msg[:200]}")
        if dev == "cuda":
            torch.cuda.empty_cache()

    def skip(op, variant, tokens, reason):
        rec(op, "-", variant, tokens, "unavailable", None, None, reason=reason)

    print(f"{EXPERIMENT}: {results.provenance().get('gpu')} | torch {torch.__version__} | records -> {path}")

    # 0. smoke
    smoke = run_smoke(dev, timeout=min(90.0, max(10.0, left() * 0.55)))
    for op, st in smoke.items():
        rec(op, "-", "smoke", None, "smoke", None, 1.0 if st.startswith("ok") else 0.0, status=st, dtype=None)
        print(f"  smoke {op:26s} {st[:150]}")
    ok = {op for op, st in smoke.items() if st.startswith("ok")}
    # a crashed kernel may leave the GPU unusable for this process too: only run what smoked cleanly
    from dsv4lab.kernels.triton import sparse_attention as SA
    scale = D_HEAD ** -0.5

    peaks = None
    if not dry:
        try:
            peaks = roofline.stored_or_measured_peaks(out)
            print("  peaks:", peaks.summary())
        except Exception as e:
            error("peaks", "-", None, e)

    def tfields(t):
        return dict(p20=t.p20, p80=t.p80, timing_mode=t.mode, rep=t.rep, warmup=t.warmup, l2_flush=t.flush_l2)

    def bench(fn, rep=20, graph=False):
        return timing.bench(fn, rep=rep if not dry else 2, warmup=3 if not dry else 1,
                            device=dev, graph=graph and not dry)   # no CUDA graphs on the CPU dry run

    prefill_T = [64] if dry else [1024, 4096, 8192, 16384]
    num_T = [64] if dry else [1024, 4096]
    rows_n = 16 if dry else 128

    # 1. numerics ---------------------------------------------------------------------------------------
    for T in num_T:
        for kind in ("window", "csa", "hca"):
            if "sparse_attention_prefill" not in ok or left() < 60:
                skip("sparse_attention", f"numerics-{kind}", T, "smoke failed or budget")
                continue
            try:
                q, kv, idx, sink, r = attention_inputs(T, kind, dev, seed=T)
                ref = None
                from dsv4lab.kernels.reference.attention import sparse_attention_with_sink as ref_fn
                ref = ref_fn(q, kv, idx, sink, scale)
                tri = SA.sparse_attention_with_sink(q, kv, idx, sink, scale)
                rows = torch.linspace(0, T - 1, rows_n, device=dev).long()
                o64 = oracle_rows(q, kv, idx, sink, scale, rows)
                c = numerics.compare(o64, ref[rows], tri[rows])
                for rr in c.to_records(experiment=EXPERIMENT, op="sparse_attention", backend="triton",
                                       variant=f"numerics-{kind}", preset="flash", tokens=T, rows_sampled=rows_n):
                    results.append(path, [rr])
                    all_recs.append(rr)
                full = float((tri.float() - ref.float()).abs().max())
                rec("sparse_attention", "triton", f"numerics-{kind}", T, "max_abs_vs_reference", "1", full)
                summary.append(f"attn {kind:6s} T={T:5d}: err_ratio {c.err_ratio:.2f} passed={c.passed} "
                               f"max|tri-ref| {full:.3g}")
                if "flex" in ok and left() > 100 and T == num_T[-1] and kind != "window":   # each shape compiles
                    from dsv4lab.kernels.torch.flex_attention import sparse_attention_flex
                    fx = sparse_attention_flex(q, kv, idx, sink, scale)
                    cf = numerics.compare(o64, ref[rows], fx[rows])
                    for rr in cf.to_records(experiment=EXPERIMENT, op="sparse_attention", backend="torch",
                                            variant=f"flex-numerics-{kind}", preset="flash", tokens=T):
                        results.append(path, [rr])
                        all_recs.append(rr)
                    summary.append(f"flex {kind:6s} T={T:5d}: err_ratio {cf.err_ratio:.2f} passed={cf.passed}")
                del ref, tri
            except Exception as e:
                error("sparse_attention", f"numerics-{kind}", T, e)

    # edge cases: empty rows, -inf sink, huge sink; unsplit and split
    if "sparse_attention_prefill" in ok:
        try:
            q, kv, idx, sink, _ = attention_inputs(256, "csa", dev, seed=5)
            idx[7] = -1
            idx[9, 3:] = -1
            sink[0], sink[1] = float("-inf"), 80.0
            from dsv4lab.kernels.reference.attention import sparse_attention_with_sink as ref_fn
            ref = ref_fn(q, kv, idx, sink, scale)
            for splits in (1, 4):
                tri = SA.sparse_attention_launch(q, kv, idx, sink, scale, num_splits=splits)
                rec("sparse_attention", "triton", f"edge-splits{splits}", 256, "max_abs_vs_reference", "1",
                    float((tri.float() - ref.float()).abs().max()), nonfinite=int((~torch.isfinite(tri.float())).sum()),
                    empty_row_zero=bool((tri[7] == 0).all()))
                summary.append(f"edge splits={splits}: max|tri-ref| {float((tri.float() - ref.float()).abs().max()):.3g}"
                               f" nonfinite {int((~torch.isfinite(tri.float())).sum())} empty-row-zero "
                               f"{bool((tri[7] == 0).all())}")
        except Exception as e:
            error("sparse_attention", "edge", 256, e)

    comp_T = [256] if dry else [4096]
    if "compressor" in ok:
        from dsv4lab.kernels.reference.compressor import compress as ref_compress
        from dsv4lab.kernels.triton.compressor import compress as tri_compress
        for T in comp_T:
            for r in (4, 128):
                try:
                    x, wkv, wg, ape, nw = compressor_inputs(T, r, dev, seed=r)
                    a = ref_compress(x, wkv, wg, ape, nw, r, inv_freq(dev), head_dim=D_HEAD, fp8_nope=True)
                    b = tri_compress(x, wkv, wg, ape, nw, r, inv_freq(dev), head_dim=D_HEAD, fp8_nope=True)
                    diff = (a.float() - b.float()).abs()
                    rec("compressor", "triton", f"numerics-r{r}", T, "max_abs_vs_reference", "1", float(diff.max()),
                        frac_not_equal=float((diff > 0).float().mean()), calc_diff=numerics.calc_diff(b, a))
                    summary.append(f"compressor r={r:3d} T={T}: max|tri-ref| {float(diff.max()):.3g} "
                                   f"frac!= {float((diff > 0).float().mean()):.4f}")
                except Exception as e:
                    error("compressor", f"numerics-r{r}", T, e)

    if "indexer_deep_gemm" in ok and not dry:
        from dsv4lab.kernels.deep_gemm.indexer import indexer_topk as dg_topk
        from dsv4lab.kernels.reference.indexer import indexer_topk as ref_topk
        for T in (1024, 4096):
            try:
                args_i = indexer_inputs(T, dev, seed=T)
                x, qr, wq_b, wp, wkv, wg, ape, nw = args_i
                pos = torch.arange(T, device=dev)
                s_ref, l_ref = ref_topk(x, qr, pos, wq_b, wp, wkv, wg, ape, nw, inv_freq(dev), K_I)
                s_dg, l_dg = dg_topk(x, qr, pos, wq_b, wp, wkv, wg, ape, nw, inv_freq(dev), K_I)
                ov = numerics.topk_overlap(s_ref, s_dg, scores=l_ref)
                for rr in ov.to_records(experiment=EXPERIMENT, op="indexer_topk", backend="deep_gemm",
                                        variant="numerics", preset="flash", tokens=T):
                    results.append(path, [rr])
                    all_recs.append(rr)
                fin = torch.isfinite(l_ref)
                cd = numerics.calc_diff(l_dg[fin], l_ref[fin])
                rec("indexer_topk", "deep_gemm", "numerics", T, "logits_calc_diff", "1", cd)
                summary.append(f"indexer T={T}: overlap mean {ov.mean_overlap:.4f} min {ov.min_overlap:.3f} "
                               f"unexplained rows {ov.unexplained_rows} logits calc_diff {cd:.2e}")
            except Exception as e:
                error("indexer_topk", "numerics", T, e)

    # 2. timing ----------------------------------------------------------------------------------------
    def time_attn(T, kind, variant, fn, cost, actual_bytes, graph=False, **extra):
        """Decode launches are timed as CUDA-graph replays (graph=True): their kernels take microseconds, so event
        timing of eager calls would measure the Python launch path; prefill is timed eagerly (milliseconds)."""
        t = timing.bench(fn, rep=20 if not dry else 2, warmup=3 if not dry else 1, device=dev, graph=graph and not dry)
        r = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="sparse_attention", backend="triton",
                        variant=variant, preset="flash", tokens=T, dtype="bfloat16")
        r["tflops"] = cost.flops / (t.p50 * 1e-6) / 1e12
        r["actual_bytes"] = actual_bytes
        r["gbps_actual"] = actual_bytes / (t.p50 * 1e-6) / 1e9
        if peaks is not None:
            r["pct_bw_actual"] = 100 * actual_bytes / (t.p50 * 1e-6) / peaks.copy_bw
            r["pct_bf16_peak"] = 100 * cost.flops / (t.p50 * 1e-6) / peaks.bf16_flops
        r.update(extra)
        results.append(path, [r])
        all_recs.append(r)
        return t, r

    prefill_inputs = {}
    if "sparse_attention_prefill" in ok:
        for T in prefill_T:
            for kind in ("csa", "hca", "window"):
                if left() < 45:
                    skip("sparse_attention", f"prefill-{kind}", T, "budget")
                    continue
                try:
                    q, kv, idx, sink, r = attention_inputs(T, kind, dev, seed=1)
                    cost = roofline.cost("sparse_attention_prefill", T=T, H=H, r=r, d=D_HEAD, W=W,
                                         K_I=K_I if r == 4 else None)
                    t, rr = time_attn(T, kind, f"prefill-{kind}", lambda: SA.sparse_attention_with_sink(
                        q, kv, idx, sink, scale), cost, cost.bytes, **attn_config_fields(SA, q, idx))
                    summary.append(f"prefill {kind:6s} T={T:5d}: {t.p50:9.1f} us {rr['tflops']:7.1f} TFLOP/s "
                                   f"({rr.get('pct_bf16_peak', float('nan')):.0f}% bf16 peak)")
                    if T in ((8192,) if not dry else (64,)) and kind in ("csa", "hca"):
                        prefill_inputs[kind] = (q, kv, idx, sink, r, cost)
                    else:
                        del q, kv, idx
                except Exception as e:
                    error("sparse_attention", f"prefill-{kind}", T, e)
        # launch-config sweep at T=8192 (CSA/HCA): every SA.CONFIGS entry + the prefill default with its trim flipped
        sweep_t0 = time.perf_counter()
        for kind, (q, kv, idx, sink, r, cost) in prefill_inputs.items():
            try:
                o_def = SA.sparse_attention_with_sink(q, kv, idx, sink, scale)
            except Exception as e:
                error("sparse_attention", f"prefill-sweep-{kind}", q.shape[0], e)
                continue
            for name, knobs in attn_sweep_cases(SA, "prefill", dry):
                if left() < 40 or time.perf_counter() - sweep_t0 > ATTN_SWEEP_S:
                    skip("sparse_attention", f"prefill-sweep-{kind}-{name}", q.shape[0], "budget")
                    continue
                try:
                    fn = functools.partial(SA.sparse_attention_launch, q, kv, idx, sink, scale, **knobs)
                    dev_max = float((fn().float() - o_def.float()).abs().max())
                    t, rr = time_attn(q.shape[0], kind, f"prefill-sweep-{kind}", fn, cost, cost.bytes,
                                      max_abs_vs_default=dev_max, **attn_config_fields(SA, q, idx, name, knobs))
                    summary.append(f"  sweep prefill {kind} T={q.shape[0]} {name:20s}: {t.p50:9.1f} us "
                                   f"{rr['tflops']:7.1f} TFLOP/s ({rr.get('pct_bf16_peak', float('nan')):.1f}%) "
                                   f"max|o-o_default| {dev_max:.3g}")
                except Exception as e:
                    error("sparse_attention", f"prefill-sweep-{kind}-{name}", q.shape[0], e)
        prefill_inputs.clear()
        tilelang_prefill_cases(dev, dry, left, rec, error, skip, time_attn, summary, numerics, roofline, SA)

    if "sparse_attention_decode" in ok:
        sweep_t0 = time.perf_counter()
        for kind, L, B, splits_list in DECODE_SWEEP_DRY if dry else DECODE_SWEEP:
            try:
                q, kv, idx, sink, r = decode_inputs(B, L, kind, dev, seed=B)
                cost = roofline.cost("sparse_attention_decode", T=B, L=L, H=H, r=r, d=D_HEAD, W=W,
                                     K_I=K_I if r == 4 else None)
                actual = B * (idx.shape[1] * (2 * D_HEAD + 4) + 4 * H * D_HEAD)
                o_def = SA.sparse_attention_with_sink(q, kv, idx, sink, scale)
            except Exception as e:
                error("sparse_attention", f"decode-sweep-{kind}-L{L}", B, e)
                continue
            cases = attn_sweep_cases(SA, "decode", dry) + [
                (f"{SA.DEFAULTS['decode']}-splits{s}", dict(SA.CONFIGS[SA.DEFAULTS["decode"]], num_splits=s))
                for s in splits_list]
            for name, knobs in cases:
                if left() < 35 or time.perf_counter() - sweep_t0 > ATTN_SWEEP_S:
                    skip("sparse_attention", f"decode-sweep-{kind}-L{L}-{name}", B, "budget")
                    continue
                try:
                    fn = functools.partial(SA.sparse_attention_launch, q, kv, idx, sink, scale, **knobs)
                    dev_max = float((fn().float() - o_def.float()).abs().max())
                    t, rr = time_attn(B, kind, f"decode-sweep-{kind}-L{L}", fn, cost, actual, graph=True,
                                      max_abs_vs_default=dev_max, **attn_config_fields(SA, q, idx, name, knobs))
                    summary.append(f"  sweep decode {kind:6s} L={L:6d} B={B:3d} {name:22s}: {t.p50:8.1f} us "
                                   f"{rr.get('pct_bw_actual', float('nan')):5.1f}% BW actual "
                                   f"{rr.get('pct_of_peak') or float('nan'):5.1f}% roofline splits={rr['num_splits']}")
                except Exception as e:
                    error("sparse_attention", f"decode-sweep-{kind}-L{L}-{name}", B, e)
            del q, kv, idx, o_def
        batches = [1, 2] if dry else [1, 16, 64, 256]
        Ls = [512] if dry else [4096, 32768, 131072]
        for L in Ls:
            for kind in ("csa", "hca", "window"):
                if kind == "window" and L != Ls[0]:
                    continue
                for B in batches:
                    if left() < 35:
                        skip("sparse_attention", f"decode-{kind}-L{L}", B, "budget")
                        continue
                    try:
                        q, kv, idx, sink, r = decode_inputs(B, L, kind, dev, seed=B)
                        cost = roofline.cost("sparse_attention_decode", T=B, L=L, H=H, r=r, d=D_HEAD, W=W,
                                             K_I=K_I if r == 4 else None)
                        actual = B * (idx.shape[1] * (2 * D_HEAD + 4) + 4 * H * D_HEAD)
                        t, rr = time_attn(B, kind, f"decode-{kind}-L{L}", lambda: SA.sparse_attention_with_sink(
                            q, kv, idx, sink, scale), cost, actual, graph=True, **attn_config_fields(SA, q, idx))
                        summary.append(f"decode {kind:6s} L={L:6d} B={B:3d}: {t.p50:8.1f} us "
                                       f"{rr['gbps_actual']:7.0f} GB/s ({rr.get('pct_bw_actual', float('nan')):.0f}% BW"
                                       f" actual, {rr.get('pct_of_peak') or float('nan'):.0f}% roofline)"
                                       f" splits={rr['num_splits']}")
                        del q, kv, idx
                    except Exception as e:
                        error("sparse_attention", f"decode-{kind}-L{L}", B, e)

    # compressor: every launch config of the kernel's CONFIGS (design "channels") and TILES_CONFIGS (design "tiles")
    # tables, per shape, is run once against the reference (numerics) and timed (kernel alone, L2 flushed) as an
    # eager call with CUDA events (comparable with earlier runs; includes any host launch gap) AND as a CUDA-graph
    # replay (kernel only; a split config's graph also holds the zeroing of its arrival counters); the launcher
    # default (DEFAULT_CONFIG) is flagged is_default. References per shape: a device copy moving the same bytes
    # (copy-same-bytes: what "70 % of copy BW" means at this size) and the default config with a read-flushed L2
    # (no dirty memset lines written back inside the kernel). Kernel shapes are the same for Flash and Pro
    # (hd = 512); hd = 128 is the indexer's own compressor. Capped at COMP_SWEEP_S.
    comp_cases = ([(64, 4, D_HEAD), (256, 128, D_HEAD), (64, 4, D_I)] if dry else
                  [(T, r, hd) for T in [4096, 16384] for r, hd in ((4, D_HEAD), (128, D_HEAD), (4, D_I))])
    comp_cap = float("inf") if dry else COMP_SWEEP_S          # the interpreter is slow: a dry run checks logic only
    if "compressor" in ok:
        from dsv4lab.kernels.reference.compressor import compress as ref_compress
        from dsv4lab.kernels.triton import compressor as TC
        comp_t0 = time.perf_counter()
        comp_table: list[str] = []
        for T, r, hd in comp_cases:
            if left() < 30 or time.perf_counter() - comp_t0 > comp_cap:
                skip("compressor", f"r{r}-hd{hd}", T, "budget")
                continue
            try:
                x, wkv, wg, ape, nw = compressor_inputs(T, r, dev, seed=2, hd=hd)
                A = x.float() @ wkv.float().T
                S = x.float() @ wg.float().T
                inv = inv_freq(dev)
                c = 2 if r == 4 else 1
                fp8 = hd == D_HEAD
                # what this kernel must move: A and S once, ape once, the bf16 entries (roofline row 11 also counts
                # the state write, which here is the GEMMs' fp32 output: reported as pct_of_peak alongside)
                actual = 8 * c * T * hd + 4 * r * c * hd + (T // r) * hd * 2
                cost = roofline.cost("compressor", T=T, r=r, hd=hd)
                n = T // r
                ref = ref_compress(x, wkv, wg, ape, nw, r, inv, head_dim=hd, fp8_nope=fp8)
                pct = (lambda us: 100 * actual / (us * 1e-6) / peaks.copy_bw) if peaks is not None else (lambda us: float("nan"))
                try:                                   # the same bytes moved by a plain device copy, same timing
                    src = torch.empty(actual // 2, dtype=torch.uint8, device=dev)
                    dst = torch.empty_like(src)
                    tc = bench(lambda: dst.copy_(src))
                    tck = None if dry else timing.kernel_time(lambda: dst.copy_(src), rep=20, device=dev)
                    rec("compressor", "torch", f"copy-same-bytes-r{r}-hd{hd}", T, "time", "us", tc.p50,
                        actual_bytes=actual, gbps_actual=actual / (tc.p50 * 1e-6) / 1e9, pct_bw_actual=pct(tc.p50),
                        hd=hd, ratio=r, kernel_p50_us=tck.p50 if tck else None,
                        kernel_pct_bw_actual=pct(tck.p50) if tck else None, **tfields(tc))
                    del src, dst
                except Exception as e:
                    tc = tck = None
                    error("compressor", f"copy-same-bytes-r{r}-hd{hd}", T, e)
                default = TC.resolve_config(r, n, hd)
                sweep = ([dict(TC.DEFAULT_CONFIG[r])] + TC.CONFIGS[r][: None if hd == D_HEAD else 3]
                         + TC.TILES_CONFIGS.get((r, hd), []))
                if dry:                            # logic check: the default and one config of each design
                    sweep = [sweep[0], TC.CONFIGS[r][0]] + TC.TILES_CONFIGS.get((r, hd), [])[-1:]
                seen, rows_out, dflt_out = [], [], None
                for k, cfg in enumerate(sweep):
                    if left() < 25 or time.perf_counter() - comp_t0 > comp_cap:
                        skip("compressor", f"sweep-r{r}-hd{hd}", T, "budget")
                        break
                    try:
                        res = TC.resolve_config(r, n, hd, cfg)
                        if res in seen:            # the same launch as an earlier config at this T
                            continue
                        seen.append(res)
                        is_default = k == 0
                        run = functools.partial(TC.compress_from_projections, A, S, ape, nw, r, inv, head_dim=hd,
                                                fp8_nope=fp8, config=cfg)
                        o = run()
                        if is_default:
                            dflt_out = o
                        max_abs = float((o.float() - ref.float()).abs().max()) if n else 0.0
                        neq = float((o != ref).float().mean()) if n else 0.0
                        vs_default = float((o.float() - dflt_out.float()).abs().max()) if n and dflt_out is not None else None
                        t = bench(run)
                        tg = bench(run, graph=True)
                        # CUPTI kernel durations: the kernel without the ~5 us launch/event floor of the other two
                        tk = None if dry else timing.kernel_time(run, rep=20, device=dev)
                        design = res.get("design", "channels")
                        variant = (f"pool-norm-rope-fp8-r{r}" if is_default and hd == D_HEAD else
                                   f"tiles-r{r}-hd{hd}" if design == "tiles" else f"sweep-r{r}-hd{hd}")
                        rr = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="compressor",
                                         backend="triton", variant=variant, preset="flash", tokens=T, dtype="float32")
                        programs = (-(-n // res["entries"]) * res["groups"] if design == "tiles"
                                    else n * (hd // res["block_c"]))                  # CTAs of the launch
                        rr.update(config=json.dumps(cfg, sort_keys=True), resolved=json.dumps(res, sort_keys=True),
                                  design=design, is_default=is_default, programs=programs, hd=hd, ratio=r,
                                  actual_bytes=actual,
                                  gbps_actual=actual / (t.p50 * 1e-6) / 1e9, graph_p50_us=tg.p50,
                                  graph_p20_us=tg.p20, graph_p80_us=tg.p80,
                                  graph_gbps_actual=actual / (tg.p50 * 1e-6) / 1e9,
                                  max_abs_vs_reference=max_abs, frac_neq_reference=neq,
                                  max_abs_vs_default=vs_default, kernel_p50_us=tk.p50 if tk else None,
                                  kernel_p20_us=tk.p20 if tk else None, kernel_p80_us=tk.p80 if tk else None)
                        if peaks is not None:
                            rr["pct_bw_actual"] = pct(t.p50)
                            rr["graph_pct_bw_actual"] = pct(tg.p50)
                            rr["kernel_pct_bw_actual"] = pct(tk.p50) if tk else None
                        results.append(path, [rr])
                        all_recs.append(rr)
                        rows_out.append(rr)
                        if is_default:
                            try:                   # read flush: no dirty memset lines written back in the kernel
                                tr = timing.bench(run, rep=20 if not dry else 2, warmup=3 if not dry else 1,
                                                  device=dev, flush_kind="read") if not dry else t
                                rec("compressor", "triton", f"default-readflush-r{r}-hd{hd}", T, "time", "us", tr.p50,
                                    flush_kind="read", actual_bytes=actual, pct_bw_actual=pct(tr.p50), hd=hd, ratio=r,
                                    config=json.dumps(cfg, sort_keys=True), **tfields(tr))
                                rr["_readflush_us"] = tr.p50
                            except Exception as e:
                                error("compressor", f"default-readflush-r{r}-hd{hd}", T, e)
                        del o
                    except Exception as e:
                        error("compressor", f"sweep-r{r}-hd{hd} {json.dumps(cfg, sort_keys=True)}", T, e)
                if hd == D_HEAD and not dry:
                    t2 = bench(lambda: TC.compress(x, wkv, wg, ape, nw, r, inv, head_dim=hd, fp8_nope=True))
                    rec("compressor", "triton", f"with-gemms-r{r}", T, "time", "us", t2.p50, **tfields(t2))
                if rows_out:
                    d = rows_out[0] if rows_out[0]["is_default"] else None
                    best_ev = min(rows_out, key=lambda q: q["value"])
                    best_gr = min(rows_out, key=lambda q: q["graph_p50_us"])
                    head = (f"compressor r={r:3d} hd={hd} T={T:5d}: copy-same-bytes "
                            f"{tc.p50 if tc else float('nan'):6.1f} us ({pct(tc.p50) if tc else float('nan'):.0f}%)"
                            f" kernel {tck.p50 if tc and tck else float('nan'):6.1f} us "
                            f"({pct(tck.p50) if tc and tck else float('nan'):.0f}%)")
                    if d is not None:
                        head += (f" | default {d['resolved']} {d['value']:6.1f} us ({d.get('pct_bw_actual', float('nan')):.0f}%)"
                                 f" graph {d['graph_p50_us']:6.1f} ({d.get('graph_pct_bw_actual', float('nan')):.0f}%)"
                                 f" readflush {d.get('_readflush_us', float('nan')):6.1f}")
                    summary.append(head)
                    kern = [q for q in rows_out if q.get("kernel_p50_us")]
                    if kern:
                        best_k = min(kern, key=lambda q: q["kernel_p50_us"])
                        summary.append(f"    best kernel-sum {best_k['resolved']} {best_k['kernel_p50_us']:6.1f} us "
                                       f"({best_k.get('kernel_pct_bw_actual') or float('nan'):.0f}%)"
                                       + (f" | default kernel-sum {d['kernel_p50_us']:6.1f} us "
                                          f"({d.get('kernel_pct_bw_actual') or float('nan'):.0f}%)" if d else ""))
                    summary.append(f"    best eager {best_ev['resolved']} {best_ev['value']:6.1f} us "
                                   f"({best_ev.get('pct_bw_actual', float('nan')):.0f}%) | best graph {best_gr['resolved']} "
                                   f"{best_gr['graph_p50_us']:6.1f} us ({best_gr.get('graph_pct_bw_actual', float('nan')):.0f}%)")
                    for q in rows_out:
                        q.pop("_readflush_us", None)
                        comp_table.append(f"    r={r:3d} hd={hd:3d} T={T:5d} {q['resolved']:62s} {q['programs']:5d} CTAs "
                                          f"eager {q['value']:7.1f} "
                                          f"graph {q['graph_p50_us']:7.1f} us ({q.get('graph_pct_bw_actual', float('nan')):3.0f}%)"
                                          f" max|d ref| {q['max_abs_vs_reference']:.3g} neq {q['frac_neq_reference']:.4f}")
                del A, S, ref
            except Exception as e:
                error("compressor", f"r{r}-hd{hd}", T, e)
        summary.extend(comp_table)
        print(f"  compressor phase: {time.perf_counter() - comp_t0:.1f} s")

    if "indexer_q" in ok:
        from dsv4lab.kernels.reference.indexer_q import indexer_q_rope_quant as ref_indexer_q
        from dsv4lab.kernels.triton import indexer_q as TQ
        from dsv4lab.rope import rope_cos_sin
        for T in ([64] if dry else [4096, 16384]):
            if left() < 25:
                skip("indexer_q_rope_quant", "time", T, "budget")
                continue
            try:
                q = torch.randn(T, N_I, D_I, device=dev).to(torch.bfloat16)
                pos = torch.arange(T, device=dev)
                w = torch.randn(T, N_I, device=dev)
                inv = inv_freq(dev)
                cost = roofline.cost("indexer_q_rope_quant", T=T, n_I=N_I, d_I=D_I)
                q8, w_out = TQ.indexer_q_rope_quant(q, pos, inv, w)
                r8, rw = ref_indexer_q(q, pos, inv, w)
                same = bool(torch.equal(q8.view(torch.uint8), r8.view(torch.uint8)) and torch.equal(w_out, rw))
                rec("indexer_q_rope_quant", "triton", "numerics", T, "bitwise_equal_vs_reference", "1", float(same),
                    q8_bytes_differing=int((q8.view(torch.uint8) != r8.view(torch.uint8)).sum()),
                    w_out_differing=int((w_out != rw).sum()))
                cos, sin = rope_cos_sin(pos, inv)
                best = dflt = None
                sweep = [dict(TQ.DEFAULT_CONFIG)] + [c for c in TQ.CONFIGS if c != TQ.DEFAULT_CONFIG]
                for k, cfg in enumerate(sweep):
                    if left() < 20:
                        skip("indexer_q_rope_quant", "sweep", T, "budget")
                        break
                    try:
                        is_default = k == 0
                        t = bench(lambda: TQ.launch(q, cos, sin, w, cfg))
                        rr = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="indexer_q_rope_quant",
                                         backend="triton", variant="kernel-sweep", preset="flash", tokens=T,
                                         dtype="bfloat16")
                        rr.update(config=json.dumps(cfg, sort_keys=True), is_default=is_default,
                                  gbps=cost.bytes / (t.p50 * 1e-6) / 1e9)
                        results.append(path, [rr])
                        all_recs.append(rr)
                        if is_default:
                            dflt = rr
                        if best is None or t.p50 < best["value"]:
                            best = rr
                    except Exception as e:
                        error("indexer_q_rope_quant", f"sweep {json.dumps(cfg, sort_keys=True)}", T, e)
                t = bench(lambda: TQ.indexer_q_rope_quant(q, pos, inv, w))      # whole op: + the cos/sin rows
                rr = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="indexer_q_rope_quant",
                                 backend="triton", variant="rope-fp8-fold", preset="flash", tokens=T, dtype="bfloat16")
                rr["gbps"] = cost.bytes / (t.p50 * 1e-6) / 1e9
                rr["config"] = json.dumps(TQ.DEFAULT_CONFIG, sort_keys=True)
                results.append(path, [rr])
                all_recs.append(rr)
                summary.append(f"indexer Q T={T:5d}: bitwise={same} | whole op {t.p50:7.1f} us "
                               f"({rr.get('pct_of_peak') or float('nan'):.0f}% BW)" +
                               (f" | kernel default {dflt['value']:7.1f} us ({dflt.get('pct_of_peak') or float('nan'):.0f}%)"
                                if dflt else "") +
                               (f" | best {best['config']} {best['value']:7.1f} us "
                                f"({best.get('pct_of_peak') or float('nan'):.0f}%)" if best else ""))
                del q, q8, r8
            except Exception as e:
                error("indexer_q_rope_quant", "time", T, e)

    if "indexer_deep_gemm" in ok and not dry:
        from dsv4lab.kernels.deep_gemm.indexer import indexer_topk as dg_topk, mqa_logits
        from dsv4lab.kernels.reference.indexer_q import quant_indexer_k
        from dsv4lab.kernels.triton.indexer_q import indexer_q_rope_quant
        for T in (4096, 16384):
            if left() < 25:
                break
            try:
                n = T // 4
                q8, w_out = indexer_q_rope_quant(torch.randn(T, N_I, D_I, device=dev).to(torch.bfloat16),
                                                 torch.arange(T, device=dev), inv_freq(dev),
                                                 torch.randn(T, N_I, device=dev))
                k8, ks = quant_indexer_k(torch.randn(n, D_I, device=dev).to(torch.bfloat16))
                ke = ((torch.arange(T, device=dev) + 1) // 4).to(torch.int32)
                kstart = torch.zeros_like(ke)
                t = bench(lambda: mqa_logits(q8, k8, ks, w_out, kstart, ke))
                cost = roofline.cost("indexer_logits_prefill", T=T, n_I=N_I, d_I=D_I, materialize=True)
                rr = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="indexer_logits",
                                 backend="deep_gemm", variant="fp8_mqa_logits", preset="flash", tokens=T, dtype="fp8")
                rr["tflops"] = cost.flops / (t.p50 * 1e-6) / 1e12
                results.append(path, [rr])
                all_recs.append(rr)
                lg = mqa_logits(q8, k8, ks, w_out, kstart, ke)
                t2 = bench(lambda: torch.topk(lg, K_I, dim=1))
                rec("indexer_topk", "torch", "topk-only", T, "time", "us", t2.p50, **tfields(t2))
                x, qr, wq_b, wp, wkv, wg, ape, nw = indexer_inputs(T, dev, seed=3)
                pos = torch.arange(T, device=dev)
                inv = inv_freq(dev)
                t3 = bench(lambda: dg_topk(x, qr, pos, wq_b, wp, wkv, wg, ape, nw, inv, K_I), rep=10)
                rec("indexer_topk", "deep_gemm", "end-to-end", T, "time", "us", t3.p50, **tfields(t3))
                summary.append(f"indexer T={T:5d}: logits {t.p50:8.1f} us ({rr['tflops']:.0f} TFLOP/s causal), "
                               f"topk {t2.p50:8.1f} us, whole op {t3.p50:8.1f} us")
                del lg
            except Exception as e:
                error("indexer_topk", "time", T, e)

    if "flex" in ok and not dry:
        from dsv4lab.kernels.torch.flex_attention import build_block_mask, dense_mask, flex_with_sink
        for T in (4096, 8192):
            for kind in ("csa", "hca"):
                if left() < (15 if T == 4096 else 40):
                    skip("sparse_attention", f"flex-prefill-{kind}", T, "budget")
                    continue
                try:
                    q, kv, idx, sink, r = attention_inputs(T, kind, dev, seed=1)
                    allowed = dense_mask(idx, kv.shape[0])
                    tm = time.perf_counter()
                    bm = build_block_mask(allowed)
                    torch.cuda.synchronize()
                    mask_s = time.perf_counter() - tm
                    anyrow = allowed.any(1)
                    opts = None
                    try:
                        flex_with_sink(q, kv, bm, sink, scale, anyrow)
                    except Exception:
                        opts = {"BLOCK_M": 32, "BLOCK_N": 32, "num_stages": 1}
                        flex_with_sink(q, kv, bm, sink, scale, anyrow, kernel_options=opts)
                    cost = roofline.cost("sparse_attention_prefill", T=T, H=H, r=r, d=D_HEAD, W=W,
                                         K_I=K_I if r == 4 else None)
                    t = bench(lambda: flex_with_sink(q, kv, bm, sink, scale, anyrow, kernel_options=opts), rep=10)
                    rr = t.to_record(cost=cost, peaks=peaks, experiment=EXPERIMENT, op="sparse_attention",
                                     backend="torch", variant=f"flex-prefill-{kind}", preset="flash", tokens=T,
                                     dtype="bfloat16")
                    rr["tflops"] = cost.flops / (t.p50 * 1e-6) / 1e12
                    rr["mask_build_s"] = mask_s
                    rr["kernel_options"] = json.dumps(opts)
                    results.append(path, [rr])
                    all_recs.append(rr)
                    summary.append(f"flex {kind:6s} T={T:5d}: {t.p50:9.1f} us {rr['tflops']:7.1f} TFLOP/s "
                                   f"(dense-equivalent FLOPs not counted; mask build {mask_s:.1f} s)")
                    del q, kv, idx, allowed, bm
                except Exception as e:
                    error("sparse_attention", f"flex-prefill-{kind}", T, e)

    print("\n".join(["", "summary:"] + summary))
    print(f"{len(all_recs)} records, {sum(r['metric'] == 'error' for r in all_recs)} errors, "
          f"{time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""compute-sanitizer over every GPU kernel of dsv4lab: memcheck for all, racecheck for the TileLang kernels.

    python bench/sanitizer.py --out $OUT            # records -> $OUT/sanitizer.jsonl
    python bench/sanitizer.py --out /tmp/x --dry-run # CPU: fake sanitizer output, checks the parsing/records

Kernels (name -> registry op/backend, or a direct call): Triton mtp_input_rmsnorm, mtp_shared_head_rmsnorm,
inv_rope_fp8_quant, moe_routing, swiglu_quant, sparse_attention (one-pass and split-list decode), compressor,
indexer_q_rope_quant; TileLang mhc_pre, mhc_post, mhc_fused_post_pre, hc_head; DeepGEMM fp8_einsum_wo_a,
moe_experts (grouped GEMM), indexer_topk (fp8_mqa_logits); the cuBLAS extension (router_gemm/cuda). Each runs
at a small and an odd token count (toy preset shapes, ``kernels.contracts.base_inputs``).

Steps (one shot on the H100; ~2 min with warm JIT caches, up to --budget 240 s on a cold machine):
1. Warm-up: the child script runs every case once without the sanitizer, in parallel processes (one per
   kernel), so TileLang / DeepGEMM / Triton / the cuBLAS extension JIT into their disk caches (same cache dirs
   as the sanitized runs). A case that fails here is recorded as "error" and left out of the sanitized runs.
2. ONE sanitizer process per tool (memcheck: every kernel; racecheck: the TileLang kernels, which use shared
   memory), both at once. The child prints ``@@SAN start <case>`` / ``@@SAN end <case> ok|error ...`` around each
   case (with a device synchronize before the end marker), so each sanitizer report is attributed to the case
   whose markers enclose it. PYTORCH_NO_CUDA_MEMORY_CACHING=1 makes every tensor its own allocation, so memcheck
   sees out-of-bounds accesses that the caching allocator's pools would hide.
3. Records: one per (kernel, tool, case): metric "sanitizer_errors" (error reports inside the case), with
   ``api_errors`` (CUDA API errors reported in the case), ``warnings``, ``first_reports`` and ``command``; plus one
   per tool with the process's own "ERROR SUMMARY" total (kernel "(process)"). A case that never finished (crash,
   timeout) gets an "error" record.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

EXPERIMENT = "sanitizer"
SANITIZER = "/usr/local/cuda/bin/compute-sanitizer"
TOKENS = (1, 37)
MIN_TOKENS = {"compressor": 4}          # one complete ratio-4 block, so the kernel has an entry to write
MARK = "@@SAN"
# kernel name -> (family, registry op, backend); family groups the warm-up processes and picks racecheck
KERNELS: dict[str, tuple[str, str, str]] = {
    "mtp_input_rmsnorm": ("triton", "mtp_input_rmsnorm", "triton"),
    "mtp_shared_head_rmsnorm": ("triton", "mtp_shared_head_rmsnorm", "triton"),
    "inv_rope_fp8_quant": ("triton", "inv_rope_fp8_quant", "triton"),
    "moe_routing": ("triton", "moe_routing", "triton"),
    "swiglu_quant": ("triton", "swiglu_quant", "triton"),
    "sparse_attention": ("triton", "sparse_attention", "triton"),
    "sparse_attention_split": ("triton", "sparse_attention", "triton"),
    "compressor": ("triton", "compressor", "triton"),
    "indexer_q_rope_quant": ("triton", "indexer_q_rope_quant", "triton"),
    "mhc_pre": ("tilelang", "mhc_pre", "tilelang"),
    "mhc_post": ("tilelang", "mhc_post", "tilelang"),
    "mhc_fused_post_pre": ("tilelang", "mhc_fused_post_pre", "tilelang"),
    "hc_head": ("tilelang", "hc_head", "tilelang"),
    "sparse_attention_tilelang": ("tilelang", "sparse_attention", "tilelang"),   # not run on a GPU yet
    "fp8_einsum_wo_a": ("deep_gemm", "fp8_einsum_wo_a", "deep_gemm"),
    "moe_experts": ("deep_gemm", "moe_experts", "deep_gemm"),
    "indexer_topk": ("deep_gemm", "indexer_topk", "deep_gemm"),
    "router_gemm_cublas": ("cuda", "router_gemm", "cuda"),
}
TOOLS = {"memcheck": None, "racecheck": "tilelang"}   # tool -> family it runs on (None = every kernel)
CACHE_ENV = {"TILELANG_CACHE_DIR": "/tmp/dsv4lab_tilelang_cache",
             "DG_JIT_CACHE_DIR": str(REPO / "build" / "deep_gemm_jit"),
             "TRITON_CACHE_DIR": str(REPO / "build" / "triton_cache")}


def case_tokens(kernel: str, tokens: list[int]) -> list[int]:
    return list(dict.fromkeys(max(t, MIN_TOKENS.get(kernel, 0)) for t in tokens))


# ---- child: run the kernel cases -----------------------------------------------------------------------------
def case_inputs(kernel: str, tokens: int, device: str):
    """(callable, args, kwargs) of one case."""
    from dsv4lab.kernels import contracts, registry

    _family, op, backend = KERNELS[kernel]
    if kernel == "swiglu_quant":
        import torch

        from dsv4lab.kernels.triton.swiglu_quant import swiglu_quant

        g = torch.Generator().manual_seed(tokens)
        gate_up = (2 * torch.randn(tokens, 2 * 256, generator=g)).to(torch.bfloat16).to(device)
        m_idx = (torch.arange(tokens) % 3).to(torch.int32).to(device)
        return swiglu_quant, (gate_up, 10.0, m_idx), {}
    # toy shapes (contracts.OP_OVERRIDES gives indexer_topk the 64 heads DeepGEMM's fp8_mqa_logits needs)
    args, kwargs = contracts.base_inputs(op, tokens, device=device, seed=tokens)
    if kernel == "sparse_attention_split":
        from dsv4lab.kernels.triton.sparse_attention import sparse_attention_launch

        return sparse_attention_launch, args, dict(kwargs, num_splits=3)
    return registry.get(op, backend), args, kwargs


def child(kernels: list[str], tokens: list[int], device: str, fake: str | None, fake_errors: set[str]) -> int:
    """Run each case between markers. ``fake`` (dry run): also print sanitizer-like reports for ``fake_errors``."""
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    n_fake = 0
    for kernel in kernels:
        for t in case_tokens(kernel, tokens):
            case = f"{kernel}:T{t}"
            print(f"{MARK} start {case}", flush=True)
            try:
                fn, args, kwargs = case_inputs(kernel, t, device)
                out = fn(*args, **kwargs)
                sync()
                outs = out if isinstance(out, tuple) else (out,)
                finite = all(bool(torch.isfinite(o.float()).all()) for o in outs
                             if isinstance(o, torch.Tensor) and o.is_floating_point())
                status = "ok" if finite else "ok nonfinite-output"
            except Exception as e:  # a Python-level failure is a result; a crash ends the process (seen by the parent)
                status = f"error {type(e).__name__}: {str(e)[:200]}".replace("\n", " ")
            if fake and kernel in fake_errors:
                n_fake += 1
                print("========= Invalid __global__ read of size 4 bytes\n=========     at fake_kernel+0x10\n"
                      "=========     by thread (0,0,0) in block (0,0,0)", flush=True)
            time.sleep(0.05 if device == "cuda" else 0)   # let the sanitizer's report of the last launch land
            print(f"{MARK} end {case} {status}", flush=True)
    if fake:
        print(f"========= ERROR SUMMARY: {n_fake} error{'s' if n_fake != 1 else ''}", flush=True)
    return 0


# ---- parsing --------------------------------------------------------------------------------------------------
_PREFIX = "========="
# memcheck ends with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: H hazards displayed (N errors, ..."
_SUMMARY = re.compile(r"(?:ERROR SUMMARY:\s*|RACECHECK SUMMARY:.*?\()(\d+)\s+error")
_NOT_REPORTS = ("ERROR SUMMARY", "COMPUTE-SANITIZER", "RACECHECK SUMMARY", "LEAK SUMMARY", "Target application",
                "This can happen", "No ")


@dataclass
class CaseResult:
    case: str
    status: str | None = None          # None: started but never finished
    errors: int = 0
    api_errors: int = 0
    warnings: int = 0
    reports: list[str] = field(default_factory=list)


def classify(line: str) -> str | None:
    """'error' | 'api' | 'warning' for the first line of a sanitizer report, None for anything else.

    Report lines are '========= <text>'; their detail lines are indented ('=========     at ...')."""
    if not line.startswith(_PREFIX):
        return None
    body = line[len(_PREFIX):]
    if not body.strip() or body.startswith("  ") or not body.startswith(" "):
        return None
    body = body.strip()
    if body.startswith(_NOT_REPORTS):
        return None
    if body.startswith("Program hit") or "on CUDA API call" in body:
        return "api"
    if body.startswith("Warning"):
        return "warning"
    return "error"


def parse(text: str) -> tuple[dict[str, CaseResult], int | None, CaseResult]:
    """Per-case results, the process's ERROR SUMMARY count (None if absent: killed/crashed) and the reports
    outside any case (startup/teardown)."""
    cases: dict[str, CaseResult] = {}
    outside = CaseResult("(outside cases)")
    current: CaseResult | None = None
    total = None
    for line in text.splitlines():
        if line.startswith(MARK + " start "):
            name = line.split()[2]
            current = cases[name] = CaseResult(name)
            continue
        if line.startswith(MARK + " end "):
            parts = line.split(maxsplit=3)
            if parts[2] in cases:
                cases[parts[2]].status = parts[3] if len(parts) > 3 else "ok"
            current = None
            continue
        m = _SUMMARY.search(line)
        if m and line.startswith(_PREFIX):
            total = int(m.group(1))
            continue
        kind = classify(line)
        if kind is None:
            continue
        # a report that lands after the end marker of its case is still counted (outside): never dropped
        target = current or outside
        if kind == "error":
            target.errors += 1
        elif kind == "api":
            target.api_errors += 1
        else:
            target.warnings += 1
        if len(target.reports) < 5:
            target.reports.append(line[len(_PREFIX):].strip()[:300])
    return cases, total, outside


# ---- parent ---------------------------------------------------------------------------------------------------
def child_command(kernels: list[str], tokens: list[int], device: str, fake: str | None = None,
                  fake_errors: list[str] = ()) -> list[str]:
    cmd = [sys.executable, "-u", str(Path(__file__).resolve()), "--child", "--kernels", ",".join(kernels),
           "--tokens", ",".join(map(str, tokens)), "--device", device]
    if fake:
        cmd += ["--fake", fake, "--fake-errors", ",".join(fake_errors) or "-"]
    return cmd


def sanitizer_command(tool: str, child_cmd: list[str]) -> list[str]:
    extra = ["--racecheck-report", "all"] if tool == "racecheck" else ["--leak-check", "no"]
    return [SANITIZER, "--tool", tool, "--print-limit", "200", *extra, *child_cmd]


def child_env(sanitized: bool) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    for k, v in CACHE_ENV.items():
        env.setdefault(k, v)
    if sanitized:
        env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    return env


def start(cmd: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen, Path]:
    fh = open(log, "w")
    return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)), log


def finish(proc: subprocess.Popen, log: Path, deadline: float) -> tuple[str, int | None]:
    """Wait until ``deadline`` (monotonic), kill on overrun; the output so far and the return code (None = killed)."""
    try:
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    return log.read_text(errors="replace"), rc


def available_kernels(device: str) -> tuple[list[str], dict[str, str]]:
    """Kernels whose registry backend can run here; the rest with the reason."""
    from dsv4lab.kernels import registry

    ok, missing = [], {}
    for k, (_fam, op, backend) in KERNELS.items():
        if op in registry.ops():
            good, why = registry.availability(op, backend)
        else:                                 # a kernel behind a registered op (swiglu_quant): its capability
            good, why = registry.capability(backend)
        if good or device == "cpu":           # dry run: try everything, failures become error records
            ok.append(k)
        else:
            missing[k] = why or "unavailable"
    return ok, missing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU: no sanitizer, fake reports, real parsing/records")
    ap.add_argument("--tokens", default=None, help="comma list (default 1,37; dry run 1,5)")
    ap.add_argument("--kernels", default=None, help="comma list of kernel names (default: all)")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--budget", type=float, default=240.0, help="seconds for warm-up + sanitizer runs")
    ap.add_argument("--warm-budget", type=float, default=100.0, help="seconds for the parallel warm-up")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--fake", default=None)
    ap.add_argument("--fake-errors", default="-")
    a = ap.parse_args(argv)

    tokens = [int(t) for t in (a.tokens or ("1,5" if a.dry_run else ",".join(map(str, TOKENS)))).split(",")]
    if a.child:
        if a.device == "cpu":
            os.environ.setdefault("TRITON_INTERPRET", "1")
        fake_errors = set() if a.fake_errors == "-" else set(a.fake_errors.split(","))
        return child(a.kernels.split(","), tokens, a.device, a.fake, fake_errors)
    if not a.out:
        ap.error("--out is required")
    t0 = time.monotonic()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cpu" if a.dry_run else "cuda"
    if a.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    from dsv4lab.lab import results

    recs: list[dict] = []

    def rec(kernel: str, tool: str, t: int | None, metric: str, value, **extra) -> None:
        fam, op, backend = KERNELS.get(kernel, ("-", kernel, "-"))
        recs.append(results.record(EXPERIMENT, op, backend, tool, "toy", t, None, metric,
                                   "errors" if metric == "sanitizer_errors" else None, value,
                                   kernel=kernel, tool=tool, family=fam, dry_run=a.dry_run, **extra))

    wanted = a.kernels.split(",") if a.kernels else list(KERNELS)
    unknown = sorted(set(wanted) - set(KERNELS))
    if unknown:
        ap.error(f"--kernels: unknown {unknown}; known {sorted(KERNELS)}")
    runnable, missing = available_kernels(device)
    for k in wanted:
        if k in missing:
            for tool in a.tools.split(","):
                rec(k, tool, None, "unavailable", None, reason=missing[k])
    kernels = [k for k in wanted if k in runnable]
    if not a.dry_run and not Path(SANITIZER).exists():
        print(f"{SANITIZER} not found; nothing to do")
        for k in kernels:
            rec(k, "memcheck", None, "unavailable", None, reason=f"{SANITIZER} not found")
        results.append(out / f"{EXPERIMENT}.jsonl", recs)
        return 1
    budget_end = t0 + a.budget

    # 1. warm-up: one normal process per kernel, all at once (TileLang/DeepGEMM JIT compiles dominate)
    warm = {k: start(child_command([k], tokens, device), child_env(False), out / f"sanitizer_warm_{k}.log")
            for k in kernels}
    warm_ok: set[str] = set()
    warm_deadline = t0 + a.warm_budget
    for k, (proc, log) in warm.items():
        text, rc = finish(proc, log, warm_deadline)
        cases, _, _ = parse(text)
        failed = 0
        for t in case_tokens(k, tokens):
            c = cases.get(f"{k}:T{t}")
            if c is not None and c.status and c.status.startswith("ok"):
                continue
            failed += 1   # a kernel failing a normal run is left out: a crash would end the sanitized process
            why = (c.status if c and c.status else
                   ("warm-up timed out" if rc is None else f"warm-up process exited {rc} in/before this case"))
            rec(k, "warmup", t, "error", None, message=why, log_tail=None if c and c.status else text[-1500:])
        if not failed:
            warm_ok.add(k)
    print(f"warm-up {time.monotonic() - t0:.0f} s: {len(warm_ok)}/{len(kernels)} kernels ran")

    # 2. one sanitizer process per tool, all at once
    runs = {}
    for tool in a.tools.split(","):
        fam = TOOLS.get(tool)
        ks = [k for k in kernels if k in warm_ok and (fam is None or KERNELS[k][0] == fam)]
        if not ks:
            continue
        ccmd = child_command(ks, tokens, device, fake=tool if a.dry_run else None,
                             fake_errors=[ks[0]] if a.dry_run else [])
        cmd = ccmd if a.dry_run else sanitizer_command(tool, ccmd)
        runs[tool] = (ks, cmd, *start(cmd, child_env(True), out / f"sanitizer_{tool}.log"))
    for tool, (ks, cmd, proc, log) in runs.items():
        text, rc = finish(proc, log, budget_end)
        cases, total, outside = parse(text)
        shown = " ".join(cmd).replace(str(REPO) + "/", "")  # repository-relative in records
        for k in ks:
            for t in case_tokens(k, tokens):
                c = cases.get(f"{k}:T{t}")
                if c is None or c.status is None:
                    why = "not reached" if c is None else "started, never finished"
                    rec(k, tool, t, "error", None, command=shown, rc=rc,
                        message=f"{why} ({'killed at the time budget' if rc is None else f'exit code {rc}'})",
                        errors_so_far=c.errors if c else None, first_reports=c.reports if c else [])
                    continue
                rec(k, tool, t, "sanitizer_errors", c.errors, command=shown, api_errors=c.api_errors,
                    warnings=c.warnings, case_status=c.status, first_reports=c.reports)
        rec("(process)", tool, None, "sanitizer_errors", total, command=shown, rc=rc,
            summary_found=total is not None, outside_errors=outside.errors, outside_api_errors=outside.api_errors,
            first_reports=outside.reports)

    path = out / f"{EXPERIMENT}.jsonl"
    results.append(path, recs)
    print_summary(recs, time.monotonic() - t0, path)
    return 0


def print_summary(recs: list[dict], seconds: float, path: Path) -> None:
    print(f"\n{'kernel':26s} {'tool':10s} {'T':>4s}  result")
    for r in recs:
        if r["metric"] == "sanitizer_errors":
            v = r["value"]
            res = f"{v} errors" if v is not None else "no ERROR SUMMARY (killed/crashed)"
            if r.get("api_errors"):
                res += f", {r['api_errors']} API errors"
            if r.get("case_status", "ok") != "ok" and r.get("case_status"):
                res += f" [{r['case_status'][:60]}]"
        else:
            res = f"{r['metric']}: {(r.get('message') or r.get('reason') or '')[:80]}"
        t = "" if r["tokens"] is None else str(r["tokens"])
        print(f"{r['kernel']:26s} {r['tool']:10s} {t:>4s}  {res}")
    print(f"{len(recs)} records -> {path} ({seconds:.0f} s)")


if __name__ == "__main__":
    sys.exit(main())

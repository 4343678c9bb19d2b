"""bench/sanitizer.py: the parsing of compute-sanitizer output and the records, on a CPU (--dry-run fakes the tool)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_sanitizer", REPO / "bench" / "sanitizer.py")
san = importlib.util.module_from_spec(_spec)
sys.modules["bench_sanitizer"] = san
_spec.loader.exec_module(san)

# what memcheck prints, shaped after its real reports: a header line, indented detail lines, the summary
CANNED = """\
========= COMPUTE-SANITIZER
========= Program hit cudaErrorInvalidValue (error 1) due to "invalid argument" on CUDA API call to cudaMemcpy.
=========     Saved host backtrace up to driver entry point at error
@@SAN start mhc_pre:T1
========= Invalid __global__ write of size 16 bytes
=========     at prenorm_gemm_kernel+0x1a0
=========     by thread (3,0,0) in block (0,0,0)
=========     Address 0x7f00 is out of bounds
=========
========= Invalid __global__ read of size 4 bytes
=========     at prenorm_gemm_kernel+0x80
@@SAN end mhc_pre:T1 ok
@@SAN start mhc_pre:T37
@@SAN end mhc_pre:T37 ok
@@SAN start hc_head:T1
========= Warning: Race reported between Read access at epilogue+0x10
========= Error: Race reported between Write access at epilogue+0x20
========= Program hit cudaErrorLaunchFailure (error 719) on CUDA API call to cudaStreamSynchronize.
@@SAN end hc_head:T1 error RuntimeError: CUDA error: unspecified launch failure
@@SAN start hc_head:T37
========= ERROR SUMMARY: 5 errors
"""


def test_parse_attributes_each_report_to_the_case_around_it():
    cases, total, outside = san.parse(CANNED)
    assert total == 5
    assert (cases["mhc_pre:T1"].errors, cases["mhc_pre:T1"].api_errors) == (2, 0)
    assert cases["mhc_pre:T1"].reports[0].startswith("Invalid __global__ write of size 16")
    assert (cases["mhc_pre:T37"].errors, cases["mhc_pre:T37"].status) == (0, "ok")
    head = cases["hc_head:T1"]
    assert (head.errors, head.warnings, head.api_errors) == (1, 1, 1)
    assert head.status.startswith("error RuntimeError")
    assert cases["hc_head:T37"].status is None                 # started, never finished
    assert (outside.errors, outside.api_errors) == (0, 1)       # the startup API error is nobody's case


@pytest.mark.parametrize("line, kind", [
    ("========= Invalid __shared__ read of size 8 bytes", "error"),
    ("========= Misaligned address", "error"),
    ("=========     at kernel+0x10", None),
    ("=========", None),
    ("========= ERROR SUMMARY: 0 errors", None),
    ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)", None),
    ("========= Target application returned an error", None),
    ("========= Program hit cudaErrorNotReady (error 600) on CUDA API call to cudaEventQuery.", "api"),
    ("========= Warning: Race reported", "warning"),
    ("Invalid __global__ read (not a sanitizer line)", None),
])
def test_classify(line, kind):
    assert san.classify(line) == kind


def test_summary_absent_when_the_process_died():
    cases, total, _ = san.parse("@@SAN start a:T1\n========= Invalid __global__ read of size 4 bytes\n")
    assert total is None and cases["a:T1"].status is None and cases["a:T1"].errors == 1


def test_commands_use_one_sanitizer_process_per_tool():
    child = san.child_command(["mhc_pre", "hc_head"], [1, 37], "cuda")
    mem, race = san.sanitizer_command("memcheck", child), san.sanitizer_command("racecheck", child)
    assert mem[:3] == [san.SANITIZER, "--tool", "memcheck"] and race[:3] == [san.SANITIZER, "--tool", "racecheck"]
    assert mem[-len(child):] == child and "--kernels" in child and "mhc_pre,hc_head" in child
    assert san.child_env(True)["PYTORCH_NO_CUDA_MEMORY_CACHING"] == "1"
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING" not in san.child_env(False) or \
        san.child_env(False)["PYTORCH_NO_CUDA_MEMORY_CACHING"] == san.os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING")


def test_every_gpu_kernel_of_the_registry_is_sanitized():
    """Each (op, backend) whose backend needs a GPU and is a kernel of ours appears in KERNELS (mega_moe: SM100)."""
    from dsv4lab.kernels import registry

    covered = {(op, be) for _fam, op, be in san.KERNELS.values()}
    for op in registry.ops():
        for be in registry.backends(op):
            if be in ("triton", "tilelang", "deep_gemm", "cuda") and op != "mega_moe":
                assert (op, be) in covered, (op, be)


def test_dry_run_end_to_end(tmp_path):
    """Fake sanitizer: one Triton kernel runs under the interpreter and gets the fake report; a TileLang kernel
    fails its CPU warm-up and becomes an error record, not a sanitized case."""
    rc = san.main(["--out", str(tmp_path), "--dry-run", "--kernels", "moe_routing,mhc_post", "--tokens", "1,3"])
    assert rc == 0
    recs = [json.loads(line) for line in (tmp_path / "sanitizer.jsonl").read_text().splitlines()]
    mem = {r["tokens"]: r for r in recs if r["kernel"] == "moe_routing" and r["tool"] == "memcheck"}
    assert {t: r["value"] for t, r in mem.items()} == {1: 1, 3: 1}     # the fake report of each case, attributed
    assert all(r["metric"] == "sanitizer_errors" and r["case_status"] == "ok" for r in mem.values())
    proc = [r for r in recs if r["kernel"] == "(process)" and r["tool"] == "memcheck"]
    assert len(proc) == 1 and proc[0]["value"] == 2 and proc[0]["summary_found"]
    warm = [r for r in recs if r["kernel"] == "mhc_post"]
    assert warm and all(r["metric"] == "error" and r["tool"] == "warmup" for r in warm)
    assert "unavailable" in warm[0]["message"]

"""Only the compressor part of bench/attention_kernels.py (issue 12): smoke, numerics and the config sweep of both
Triton designs ("channels", "tiles") at T in {4096, 16384} for r=4/hd=512, r=128/hd=512 and r=4/hd=128.

    python bench/attention_compressor_only.py --out $OUT          # records -> $OUT/attention_kernels.jsonl
    python bench/attention_compressor_only.py --out /tmp/x --cpu-dry-run

Same records, summary and flags as attention_kernels.py; every other op is left out of the smoke list, so its
phases do not run. Expected GPU time: well under a minute (the compressor phase is capped at COMP_SWEEP_S).
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import attention_kernels  # noqa: E402

if __name__ == "__main__":
    attention_kernels.SMOKE_OPS = ["compressor"]
    sys.exit(attention_kernels.main())

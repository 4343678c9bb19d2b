"""The lab harness: numerics (error metrics), timing (events, graphs, L2 flush, kernel counts), roofline
(bytes/FLOPs per op, measured peaks), results (the JSONL store) and report (static HTML of stored results).

Import the submodules directly (``from dsv4lab.lab import timing``); the most used names are re-exported here.
plotly is imported only when a report is built.
"""
from .numerics import Comparison, calc_diff, compare, rel_rms, topk_overlap, ulp_diff
from .results import ResultsError, append, gpu_slug, load, record, results_path
from .roofline import OpCost, cost, load_peaks, measure_peaks, pct_of_peak
from .timing import Timing, bench, host_overhead, kernels_per_call

__all__ = ["Comparison", "calc_diff", "compare", "rel_rms", "topk_overlap", "ulp_diff", "ResultsError", "append",
           "gpu_slug", "load", "record", "results_path", "OpCost", "cost", "load_peaks", "measure_peaks",
           "pct_of_peak", "Timing", "bench", "host_overhead", "kernels_per_call", "build_report"]


def build_report(*args, **kwargs):
    """See ``dsv4lab.lab.report.build_report`` (imported lazily: it needs plotly)."""
    from .report import build_report as _build

    return _build(*args, **kwargs)

"""The results store: one JSON object per line in ``data/results/<gpu-slug>/<experiment>.jsonl``.

The schema is documented in ``data/README.md``. In short, every record carries

    experiment, op, backend, variant, preset, tokens, dtype, metric, unit, value      (what was measured)
    gpu, driver, cuda, torch, triton, tilelang, deep_gemm, commit, timestamp          (provenance)

plus any extra fields. ``metric == "time"`` records also carry ``p20`` and ``p80`` (``value`` is the median);
``"unavailable"`` / ``"error"`` records carry a ``reason`` or ``message``.

JSON has no literal for inf/NaN, so non-finite floats are written as the strings ``"inf"``, ``"-inf"``,
``"nan"`` and turned back into floats by ``load`` for the numeric columns.

Appends are atomic between cooperating processes: the whole batch is one ``os.write`` on an ``O_APPEND``
descriptor under an exclusive ``fcntl.flock``. If an earlier writer died mid-line, the next append starts on a
fresh line, so the torn fragment stays on a line of its own and is reported by ``load`` as ``path:line``.
"""
from __future__ import annotations

import fcntl
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

REQUIRED = ("experiment", "op", "backend", "variant", "preset", "tokens", "dtype", "metric", "unit", "value")
PROVENANCE = ("gpu", "driver", "cuda", "torch", "triton", "tilelang", "deep_gemm", "commit", "timestamp")
NUMERIC_FIELDS = ("value", "p20", "p50", "p80", "bytes", "flops", "pct_of_peak")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
_REPO = Path(__file__).resolve().parents[2]


class ResultsError(ValueError):
    """A malformed record or results file; the message starts with ``path:line:`` when a file is involved."""


# ---- provenance ---------------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _run(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dist_version(module: str, dists: tuple[str, ...]) -> str | None:
    """Version of the first installed distribution in ``dists``; no import unless only the module is found.

    The GPU host gets tilelang/deep_gemm from an unpacked bundle on PYTHONPATH that may lack dist-info; then the
    module is imported (on that host only, where it works) and its ``__version__`` read.
    """
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        if importlib.util.find_spec(module) is None:
            return None
    except (ImportError, ValueError):
        return None
    import torch

    if not torch.cuda.is_available():
        return "installed (version not read on CPU)"
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # a broken GPU-side install is provenance too
        return f"import failed: {type(e).__name__}"
    return str(getattr(mod, "__version__", "unknown"))


def _commit() -> str | None:
    """The ``DSV4LAB_COMMIT`` variable when set (``bench/run_gpu.sh`` reads it from a carried ``.commit`` file: the
    GPU host's copy of the tree may hold a stale .git), else ``git rev-parse --short HEAD`` (+ ``+dirty``)."""
    stamped = os.environ.get("DSV4LAB_COMMIT")
    if stamped:   # set on purpose (bench/run_gpu.sh): the GPU host's copy may carry a stale .git
        return stamped
    sha = _run(["git", "rev-parse", "--short", "HEAD"], cwd=_REPO)
    if not sha:
        return None
    status = _run(["git", "status", "--porcelain"], cwd=_REPO)
    return sha + ("+dirty" if status else "")


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """Machine and software versions, computed once per process (``timestamp`` is added per record)."""
    import torch

    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name()
        smi = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) \
            if shutil.which("nvidia-smi") else None
        driver = smi.splitlines()[0].strip() if smi else None
    else:
        gpu, driver = f"cpu: {_cpu_model()}", None
    return {
        "gpu": gpu,
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _dist_version("triton", ("triton",)),
        "tilelang": _dist_version("tilelang", ("tilelang",)),
        "deep_gemm": _dist_version("deep_gemm", ("sgl-deep-gemm", "tokenspeed-deepgemm", "deep-gemm", "deep_gemm")),
        "commit": _commit(),
    }


_SLUG_PATTERN = re.compile(r"\b(GB\d{3}|[ABHL]\d{2,3}[A-Z]?|RTX ?\d{4})\b", re.IGNORECASE)


def gpu_slug(device_name: str | None = None, count: int | None = None) -> str:
    """Folder name for this machine: ``'cpu'``, ``'h100'``, ``'h200'``, ``'h200x2'`` (several GPUs), ...

    ``device_name``/``count`` default to the current CUDA device name and ``torch.cuda.device_count()``.
    """
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return "cpu"
        device_name = torch.cuda.get_device_name()
        count = torch.cuda.device_count() if count is None else count
    if device_name.lower().startswith("cpu"):
        return "cpu"
    m = _SLUG_PATTERN.search(device_name)
    base = m.group(1).replace(" ", "").lower() if m else re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")
    return f"{base}x{count}" if count and count > 1 else base


def default_root() -> Path:
    """``$DSV4LAB_RESULTS`` if set, else ``<repo>/data/results``."""
    env = os.environ.get("DSV4LAB_RESULTS")
    return Path(env) if env else _REPO / "data" / "results"


def results_path(experiment: str, slug: str | None = None, root: str | os.PathLike | None = None) -> Path:
    """``<root>/<slug>/<experiment>.jsonl`` (root: ``default_root()``, slug: ``gpu_slug()``)."""
    if not isinstance(experiment, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", experiment):
        raise ValueError(f"experiment: expected a file-name-safe string, got {experiment!r}")
    return Path(root if root is not None else default_root()) / (slug or gpu_slug()) / f"{experiment}.jsonl"


# ---- records ------------------------------------------------------------------------------------------
def record(experiment: str, op: str, backend: str, variant: str, preset: str | None, tokens: int | None,
           dtype: str | None, metric: str, unit: str | None, value: Any, **extra: Any) -> dict[str, Any]:
    """One validated record with provenance (``extra`` fields are kept; they may not override provenance)."""
    clash = sorted(set(extra) & set(PROVENANCE))
    if clash:
        raise ValueError(f"extra: provenance fields are filled in automatically, got {clash}")
    if hasattr(dtype, "is_floating_point"):  # a torch.dtype
        dtype = str(dtype).removeprefix("torch.")
    if tokens is not None and not isinstance(tokens, bool) and hasattr(tokens, "__index__"):
        tokens = int(tokens)  # numpy / torch integers
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        value = value.item()  # numpy / torch scalars
    rec = dict(experiment=experiment, op=op, backend=backend, variant=variant, preset=preset, tokens=tokens,
               dtype=dtype, metric=metric, unit=unit, value=value, **extra)
    rec.update(provenance())
    rec["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    problem = validate(rec)
    if problem:
        raise ResultsError(f"record: {problem}")
    return rec


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) or (isinstance(v, str) and v in _NONFINITE)


def validate(rec: Any) -> str | None:
    """The first problem with ``rec`` as a sentence, or None when it follows the schema."""
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    missing = [k for k in REQUIRED + PROVENANCE if k not in rec]
    if missing:
        return f"missing field(s) {missing}"
    for k in ("experiment", "op", "backend", "variant", "metric"):
        if not isinstance(rec[k], str) or not rec[k]:
            return f"{k}: expected a non-empty string, got {rec[k]!r}"
    for k in ("preset", "dtype", "unit", "gpu", "timestamp"):
        if rec[k] is not None and not isinstance(rec[k], str):
            return f"{k}: expected a string or null, got {rec[k]!r}"
    if not isinstance(rec["gpu"], str) or not isinstance(rec["timestamp"], str):
        return "gpu and timestamp: expected strings"
    t = rec["tokens"]
    if t is not None and (not isinstance(t, int) or isinstance(t, bool) or t < 0):
        return f"tokens: expected a non-negative int or null, got {t!r}"
    v = rec["value"]
    if not (v is None or isinstance(v, (bool, str)) or _is_num(v)):
        return f"value: expected a number, bool, string or null, got {type(v).__name__}"
    metric = rec["metric"]
    if metric == "time":
        for k in ("value", "p20", "p80"):
            if not _is_num(rec.get(k)):
                return f"{k}: a 'time' record needs a number, got {rec.get(k)!r}"
        lo, mid, hi = (_as_float(rec[k]) for k in ("p20", "value", "p80"))
        if not lo <= mid <= hi:
            return f"time: expected p20 <= value (p50) <= p80, got {lo}, {mid}, {hi}"
    if metric in ("unavailable", "error"):
        why = rec.get("reason") or rec.get("message")
        if not isinstance(why, str) or not why:
            return f"a {metric!r} record needs a non-empty 'reason' or 'message'"
    return None


def _as_float(v: Any) -> float:
    return _NONFINITE[v] if isinstance(v, str) else float(v)


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if hasattr(v, "item") and callable(v.item) and getattr(v, "ndim", 1) == 0:  # numpy / torch scalar
        return _json_safe(v.item())
    return v


def dumps(rec: dict[str, Any]) -> str:
    """One JSON line (no newline), strict JSON (non-finite floats as strings)."""
    return json.dumps(_json_safe(rec), allow_nan=False, separators=(",", ":"), default=str)


def append(path: str | os.PathLike, records: dict | Iterable[dict]) -> int:
    """Append ``records`` to ``path`` as one atomic write; returns the number of records written.

    Every record is validated first (nothing is written if one is bad). The batch goes out in a single
    ``os.write`` on an ``O_APPEND`` descriptor while holding ``flock(LOCK_EX)``, so concurrent appenders never
    interleave. If the file does not end with a newline (a writer died mid-line) the batch starts with one.
    """
    recs = [records] if isinstance(records, dict) else list(records)
    for i, r in enumerate(recs):
        problem = validate(r)
        if problem:
            raise ResultsError(f"records[{i}]: {problem}")
    if not recs:
        return 0
    payload = "".join(dumps(r) + "\n" for r in recs).encode()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            payload = b"\n" + payload
        view = memoryview(payload)
        while view:  # a regular-file write is normally complete; loop anyway, still under the lock
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # also releases the lock
    return len(recs)


# ---- reading ------------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike, strict: bool = True,
                 problems: list[str] | None = None) -> list[dict[str, Any]]:
    """Records of one file, each with ``_file`` and ``_line`` added.

    A line that is not valid JSON or breaks the schema raises ``ResultsError("path:line: reason")``; with
    ``strict=False`` it is appended to ``problems`` instead (the caller must show it). Blank lines are ignored.
    """
    out = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            text = raw.decode("utf-8", errors="replace").strip()
            if not text:
                continue
            try:
                rec = json.loads(text)
                problem = validate(rec)
            except json.JSONDecodeError as e:
                truncated = "" if raw.endswith(b"\n") else " (truncated last line?)"
                problem = f"invalid JSON{truncated}: {e.msg} at column {e.colno}"
            if problem:
                msg = f"{path}:{lineno}: {problem}"
                if strict:
                    raise ResultsError(msg)
                if problems is not None:
                    problems.append(msg)
                continue
            rec["_file"], rec["_line"] = str(path), lineno
            out.append(rec)
    return out


def result_files(root: str | os.PathLike | None = None, slug: str | None = None,
                 experiment: str | None = None) -> list[Path]:
    """``<root>/<slug>/<experiment>.jsonl`` files that exist, sorted (None = any)."""
    root = Path(root if root is not None else default_root())
    if not root.is_dir():
        return []
    return sorted(root.glob(f"{slug or '*'}/{experiment or '*'}.jsonl"))


def load(root: str | os.PathLike | None = None, slug: str | None = None, experiment: str | None = None,
         paths: Iterable[str | os.PathLike] | None = None, strict: bool = True):
    """All matching records as a pandas DataFrame (one row per record, extra fields as columns).

    Adds ``slug`` (the folder), ``_file`` and ``_line``. Numeric columns (``NUMERIC_FIELDS``) turn the strings
    "inf"/"-inf"/"nan" back into floats. ``strict=False`` skips malformed lines but lists them, as
    ``"path:line: reason"``, in ``df.attrs["problems"]`` (and warns); ``strict=True`` raises on the first one.
    """
    import warnings

    import pandas as pd

    files = [Path(p) for p in paths] if paths is not None else result_files(root, slug, experiment)
    problems: list[str] = []
    rows = []
    for p in files:
        for rec in read_records(p, strict=strict, problems=problems):
            rec["slug"] = p.parent.name
            rows.append(rec)
    df = pd.DataFrame(rows)
    for col in NUMERIC_FIELDS:
        if col in df.columns:
            df[col] = df[col].map(lambda v: _NONFINITE.get(v, v) if isinstance(v, str) else v)
    df.attrs["problems"] = problems
    if problems:
        warnings.warn(f"{len(problems)} malformed record(s) skipped: " + "; ".join(problems[:5]), stacklevel=2)
    return df

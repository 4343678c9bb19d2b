"""lab.results: records, validation, atomic appends under concurrency and crashes, file:line errors."""
import json
import math
import multiprocessing
import os
import re
from datetime import datetime

import pytest

from dsv4lab.lab import results
from dsv4lab.lab.results import ResultsError, append, gpu_slug, load, read_records, record, results_path

BASE = dict(experiment="unit", op="rmsnorm", backend="triton", variant="after", preset="toy", tokens=16,
            dtype="bfloat16")


def _rec(metric="max_abs", unit="abs", value=0.5, **extra):
    return record(**BASE, metric=metric, unit=unit, value=value, **extra)


def test_record_adds_provenance():
    r = _rec(shape=[16, 64])
    for k in results.REQUIRED + results.PROVENANCE:
        assert k in r
    assert r["shape"] == [16, 64]
    assert r["gpu"].startswith("cpu: ") and r["cuda"] is None and r["driver"] is None
    assert r["torch"].startswith("2.") and r["deep_gemm"] is None          # not installed on the CPU box
    assert datetime.fromisoformat(r["timestamp"]).utcoffset().total_seconds() == 0
    assert r["commit"] is None or re.fullmatch(r"[0-9a-f]{4,40}(\+dirty)?", r["commit"])
    assert results.provenance() is results.provenance()                     # cached per process


def test_record_rejects_bad_records():
    with pytest.raises(ResultsError, match="p20 <= value"):
        _rec(metric="time", unit="us", value=5.0, p20=6.0, p80=7.0)
    with pytest.raises(ResultsError, match="'time' record needs a number"):
        _rec(metric="time", unit="us", value=5.0)
    with pytest.raises(ResultsError, match="reason"):
        _rec(metric="unavailable", unit=None, value=None)
    with pytest.raises(ResultsError, match="tokens"):
        record(**{**BASE, "tokens": -1}, metric="max_abs", unit="abs", value=1.0)
    with pytest.raises(ValueError, match="provenance"):
        _rec(gpu="fake")
    assert _rec(metric="unavailable", unit=None, value=None, reason="needs CUDA")["reason"] == "needs CUDA"


def test_record_accepts_numpy_and_torch_scalars():
    import numpy as np
    import torch

    r = record(**{**BASE, "tokens": np.int64(16), "dtype": torch.bfloat16}, metric="max_abs", unit="abs",
               value=torch.tensor(0.25))
    assert type(r["tokens"]) is int and r["dtype"] == "bfloat16" and r["value"] == 0.25


def test_append_and_load_roundtrip_with_nonfinite(tmp_path):
    path = results_path("unit", slug="cpu", root=tmp_path)
    assert path == tmp_path / "cpu" / "unit.jsonl"
    recs = [_rec(value=1.25), _rec(metric="err_ratio", unit="x", value=math.inf),
            _rec(metric="time", unit="us", value=3.0, p20=2.0, p80=4.0, timing_mode="cpu-clock")]
    assert append(path, recs) == 3
    assert append(path, _rec(metric="bitwise_equal", unit="bool", value=True)) == 1
    text = path.read_text()
    assert "Infinity" not in text and '"inf"' in text                        # strict JSON on disk
    df = load(root=tmp_path)
    assert len(df) == 4 and set(df["slug"]) == {"cpu"}
    assert df.loc[df["metric"] == "err_ratio", "value"].iloc[0] == math.inf
    assert df.loc[df["metric"] == "time", "p80"].iloc[0] == 4.0
    assert df["_line"].tolist() == [1, 2, 3, 4]
    assert len(load(root=tmp_path, experiment="other")) == 0


def test_append_validates_everything_before_writing(tmp_path):
    path = tmp_path / "cpu" / "unit.jsonl"
    good = _rec()
    bad = dict(good, metric="time", value=1.0)                               # no p20/p80
    with pytest.raises(ResultsError, match=r"records\[1\]"):
        append(path, [good, bad])
    assert not path.exists()


def test_malformed_json_reports_file_and_line(tmp_path):
    path = tmp_path / "h100" / "unit.jsonl"
    append(path, [_rec(), _rec()])
    lines = path.read_text().splitlines()
    path.write_text(lines[0] + "\n{not json}\n" + lines[1] + "\n")
    with pytest.raises(ResultsError, match=re.escape(f"{path}:2: invalid JSON")):
        read_records(path)
    with pytest.warns(UserWarning, match="1 malformed"):
        df = load(root=tmp_path, strict=False)
    assert len(df) == 2 and df.attrs["problems"][0].startswith(f"{path}:2:")


def test_schema_violation_reports_file_and_line(tmp_path):
    path = tmp_path / "cpu" / "unit.jsonl"
    append(path, _rec())
    broken = dict(_rec())
    del broken["op"]
    with open(path, "a") as f:
        f.write(json.dumps(broken) + "\n")
    with pytest.raises(ResultsError, match=re.escape(f"{path}:2: missing field(s) ['op']")):
        load(root=tmp_path)


def test_truncated_last_line_reports_file_and_line(tmp_path):
    path = tmp_path / "cpu" / "unit.jsonl"
    append(path, [_rec(), _rec()])
    line = results.dumps(_rec())
    with open(path, "a") as f:
        f.write(line[: len(line) // 2])                                      # no newline: a torn write
    with pytest.raises(ResultsError, match=re.escape(f"{path}:3: invalid JSON (truncated last line?)")):
        read_records(path)


def _torn_append(path, rec):
    """Child process: the write puts out half the batch, then the process dies."""
    real_write = os.write

    def half_then_die(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        os._exit(3)

    os.write = half_then_die
    append(path, [rec])


def test_crash_mid_write_keeps_earlier_records(tmp_path):
    path = tmp_path / "cpu" / "unit.jsonl"
    append(path, [_rec(value=1.0), _rec(value=2.0)])
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_torn_append, args=(path, _rec(value=3.0, pad="x" * 3000)))
    p.start()
    p.join(30)
    assert p.exitcode == 3
    with pytest.raises(ResultsError, match=re.escape(f"{path}:3:")):
        read_records(path)
    append(path, _rec(value=4.0))                                            # starts on a fresh line
    problems = []
    recs = read_records(path, strict=False, problems=problems)
    assert [r["value"] for r in recs] == [1.0, 2.0, 4.0]
    assert len(problems) == 1 and problems[0].startswith(f"{path}:3:")


def _writer(path, worker, batches, rec):
    for b in range(batches):
        append(path, [dict(rec, worker=worker, batch=b, item=i) for i in range(3)])


def test_concurrent_appends_never_interleave(tmp_path):
    path = tmp_path / "cpu" / "unit.jsonl"
    rec = _rec(pad="y" * 6000)                   # lines far above PIPE_BUF (4 KiB): tearing would show
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 60, rec)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    recs = read_records(path)                     # strict: every line is a whole record
    assert len(recs) == 2 * 60 * 3
    for i in range(0, len(recs), 3):              # each batch of 3 is contiguous
        batch = recs[i:i + 3]
        assert {(r["worker"], r["batch"]) for r in batch} == {(batch[0]["worker"], batch[0]["batch"])}
        assert [r["item"] for r in batch] == [0, 1, 2]
    for w in range(2):
        assert sorted({r["batch"] for r in recs if r["worker"] == w}) == list(range(60))


def test_gpu_slug():
    assert gpu_slug("NVIDIA H100 80GB HBM3", 1) == "h100"
    assert gpu_slug("NVIDIA H100 PCIe", 1) == "h100"
    assert gpu_slug("NVIDIA H200", 2) == "h200x2"
    assert gpu_slug("NVIDIA H200", 8) == "h200x8"
    assert gpu_slug("NVIDIA B200", 1) == "b200"
    assert gpu_slug("cpu: AMD EPYC 7B13", None) == "cpu"
    assert gpu_slug("Some Future Accelerator", 1) == "some-future-accelerator"
    assert gpu_slug() == "cpu"                    # this test machine has no GPU


def test_results_path_validation(tmp_path):
    with pytest.raises(ValueError, match="experiment"):
        results_path("../escape", root=tmp_path)
    assert results_path("pr41300_router_gemm", root=tmp_path).parent.name == "cpu"


def test_load_of_missing_root_is_empty(tmp_path):
    df = load(root=tmp_path / "nothing")
    assert len(df) == 0 and df.attrs["problems"] == []


def test_crash_mid_write_while_another_process_appends(tmp_path):
    """Two healthy writers and one that dies halfway through its write, all at once: every healthy batch is whole
    and present, the torn line is the only problem, and it never swallows the start of a neighbour's line."""
    path = tmp_path / "cpu" / "unit.jsonl"
    rec = _rec(pad="z" * 6000)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(path, w, 30, rec)) for w in range(2)]
    procs.append(ctx.Process(target=_torn_append, args=(path, _rec(value=-1.0, pad="t" * 6000))))
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 3]
    problems = []
    recs = read_records(path, strict=False, problems=problems)
    assert len(problems) == 1                     # exactly the torn half line
    assert len(recs) == 2 * 30 * 3 and all(r["value"] != -1.0 for r in recs)
    for w in range(2):
        assert sorted({r["batch"] for r in recs if r["worker"] == w}) == list(range(30))


def test_stamped_commit_wins_over_git(monkeypatch):
    from dsv4lab.lab import results as R

    monkeypatch.setenv("DSV4LAB_COMMIT", "abc1234+dirty")
    assert R._commit() == "abc1234+dirty"
    monkeypatch.delenv("DSV4LAB_COMMIT")
    sha = R._commit()
    assert sha is None or sha.split("+")[0].isalnum()

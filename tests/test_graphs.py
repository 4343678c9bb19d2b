"""dsv4lab.graphs: breakable-graph bookkeeping on the FakeGraphBackend (CPU), plus a CUDA check when a GPU exists.

The fake replays the aten ops recorded in each segment on the same tensors, so the properties a CUDA graph has
(frozen host values, fixed addresses, segments in capture order, one pool) are observable on a CPU.
"""
import math

import pytest
import torch

from dsv4lab import graphs as G


class Meta:
    """A mutable per-step metadata holder (what attention reads at a break)."""

    def __init__(self, k: float = 1.0) -> None:
        self.k = k


def make_model(log=None):
    """Two breaks. y = ((x+1)*k1 + 1) ... written out below; ``ref`` computes it directly."""
    @G.eager_break
    def scale_into(src, out, meta, tag):
        if log is not None:
            log.append(("eager", tag))
        out.copy_(src * meta.k)

    def fwd(x, buf_a, buf_b, meta):
        y = torch.sin(x) + 1.0              # segment 0
        scale_into(y, buf_a, meta, 0)
        z = buf_a * 2.0 + y                  # segment 1 (reads the break's buffer and segment 0's output)
        scale_into(z, buf_b, meta, 1)
        return buf_b - z.cos()               # segment 2

    def ref(x, meta):
        y = torch.sin(x) + 1.0
        z = y * meta.k * 2.0 + y
        return z * meta.k - z.cos()

    return fwd, ref


def setup(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    return x, torch.zeros(n), torch.zeros(n), Meta(1.5)


def test_steps_and_backend_calls_follow_capture_order():
    log = []
    fwd, _ = make_model(log)
    x, a, b, meta = setup()
    be = G.FakeGraphBackend()
    be.log = log                                     # one list: backend calls and eager runs interleaved
    g = G.capture(fwd, x, a, b, meta, backend=be, warmup=0)
    assert [s.kind for s in g.steps] == ["graph", "eager", "graph", "eager", "graph"]
    assert (g.num_graphs, g.num_breaks) == (3, 2)
    pool = [e[1] for e in log if e[0] == "new_pool"]
    assert len(pool) == 1
    capture_log = [e for e in log if e[0] in ("begin", "end", "eager")]
    assert [e[:2] for e in capture_log] == [("begin", 0), ("end", 0), ("eager", 0), ("begin", 1), ("end", 1),
                                             ("eager", 1), ("begin", 2), ("end", 2)]
    assert {e[2] for e in log if e[0] == "begin"} == set(pool), "every segment must use the capture's one pool"
    assert [e[2] > 0 for e in log if e[0] == "end"] == [True] * 3
    log.clear()
    g.replay()
    assert log == [("replay", 0), ("eager", 0), ("replay", 1), ("eager", 1), ("replay", 2)]


def test_replay_matches_eager_with_fresh_host_metadata_and_inputs():
    fwd, ref = make_model()
    x, a, b, meta = setup()
    g = G.capture(fwd, x, a, b, meta, backend=G.FakeGraphBackend(), warmup=1)
    gen = torch.Generator().manual_seed(1)
    for k in (0.5, 2.0, -3.0):
        meta.k = k                                   # host state changes between replays
        x.copy_(torch.randn(x.shape, generator=gen))  # the static input buffer is refilled in place
        out = g.replay()
        torch.testing.assert_close(out, ref(x, meta), rtol=0, atol=0)


def test_output_and_buffers_keep_their_addresses():
    fwd, _ = make_model()
    x, a, b, meta = setup()
    g = G.capture(fwd, x, a, b, meta, backend=G.FakeGraphBackend(), warmup=0)
    ptrs = {g.output.data_ptr(), a.data_ptr(), b.data_ptr()}
    first = g.replay().clone()
    meta.k = -1.0
    second = g.replay()
    assert second is g.output
    assert {g.output.data_ptr(), a.data_ptr(), b.data_ptr()} == ptrs
    assert not torch.equal(first, second)


def test_capture_alone_produces_no_values():
    """A CUDA capture records kernels without running them; the fake poisons fresh outputs the same way."""
    fwd, ref = make_model()
    x, a, b, meta = setup()
    g = G.capture(fwd, x, a, b, meta, backend=G.FakeGraphBackend(), warmup=0)
    assert torch.isnan(g.output).all()
    assert torch.equal(g.replay(), ref(x, meta))


def test_frozen_host_value_is_stale_where_a_mutable_holder_is_fresh():
    """The contract: non-tensor arguments of an eager break are bound at capture."""
    @G.eager_break
    def scale_by_number(src, out, k):
        out.copy_(src * k)

    def fwd(x, out, meta):
        scale_by_number(x + 1.0, out, meta.k)        # meta.k evaluated once, at capture
        return out * 1.0

    x, out, _, meta = setup()
    g = G.capture(fwd, x, out, meta, backend=G.FakeGraphBackend(), warmup=0)
    meta.k = 4.0
    assert torch.equal(g.replay(), (x + 1.0) * 1.5), "the captured k (1.5) is used, not the new one"


def test_full_capture_inlines_the_break_and_freezes_its_host_state():
    fwd, ref = make_model()
    x, a, b, meta = setup()
    calls = []
    be = G.FakeGraphBackend()
    g = G.capture(fwd, x, a, b, meta, backend=be, breaks=False, warmup=0)
    assert [s.kind for s in g.steps] == ["graph"] and g.num_breaks == 0
    calls = [e[0] for e in be.log]
    assert calls.count("begin") == 1 and calls.count("end") == 1
    captured = Meta(meta.k)
    meta.k = 3.0
    out = g.replay()
    assert torch.equal(out, ref(x, captured)), "a full graph replays the capture-time k"
    assert not torch.equal(out, ref(x, meta))


def test_outside_a_capture_the_decorator_is_a_plain_call():
    @G.eager_break
    def add_into(src, out):
        out.add_(src)
        return out

    out = torch.zeros(3)
    assert add_into(torch.ones(3), out) is out and torch.equal(out, torch.ones(3))
    assert G.is_eager_break(add_into) and not G.is_eager_break(make_model)
    assert G.current_capture() is None


def test_eager_break_returning_a_fresh_tensor_is_rejected():
    @G.eager_break
    def fresh(src):
        return src * 2.0

    def fwd(x):
        return fresh(x + 1.0) + 1.0

    with pytest.raises(G.CaptureError, match="freshly allocated"):
        G.capture(fwd, torch.ones(4), backend=G.FakeGraphBackend(), warmup=0)
    assert G.current_capture() is None


def test_host_value_returned_by_an_eager_break_is_rejected():
    @G.eager_break
    def count(src):
        return int(src.numel())

    with pytest.raises(G.CaptureError, match="must return None"):
        G.capture(lambda x: x * count(x), torch.ones(4), backend=G.FakeGraphBackend(), warmup=0)


@pytest.mark.parametrize("sync", [lambda x: x.sum().item(), lambda x: torch.nonzero(x > 0),
                                  lambda x: x[x > 0], lambda x: torch.unique(x),
                                  lambda x: torch.repeat_interleave(x, (x > 0).long())],
                         ids=["item", "nonzero", "bool-index", "unique", "repeat_interleave"])
def test_host_syncs_inside_a_segment_are_rejected(sync):
    def fwd(x):
        y = x + 1.0
        sync(y)
        return y

    with pytest.raises(G.CaptureError, match="host sync"):
        G.capture(fwd, torch.randn(8), backend=G.FakeGraphBackend(), warmup=0)
    assert G.current_capture() is None
    # ... but the same call inside an eager break is fine: it runs eagerly
    @G.eager_break
    def eager_sync(src, out):
        out.fill_(float(src.sum().item()))

    out = torch.zeros(1)
    g = G.capture(lambda x: eager_sync(x + 1.0, out) or out * 2.0, torch.ones(8), backend=G.FakeGraphBackend(),
                  warmup=0)
    assert g.replay().item() == 32.0


def test_nesting_is_refused_and_a_failed_capture_cleans_up():
    be = G.FakeGraphBackend()
    with G.BreakableCapture(be):
        with pytest.raises(G.CaptureError, match="already active"):
            G.BreakableCapture(be).__enter__()
    assert G.current_capture() is None

    def boom(x):
        x = x + 1.0
        raise KeyError("model bug")

    with pytest.raises(KeyError):
        G.capture(boom, torch.ones(2), backend=be, warmup=0)
    assert G.current_capture() is None and be._recorder is None
    fwd, ref = make_model()
    x, a, b, meta = setup()
    assert torch.equal(G.capture(fwd, x, a, b, meta, backend=be, warmup=0).replay(), ref(x, meta))


def test_warmup_runs_before_the_capture():
    seen = []

    def fwd(x):
        seen.append(G.current_capture() is not None)
        return x * 2.0

    G.capture(fwd, torch.ones(2), backend=G.FakeGraphBackend(), warmup=3)
    assert seen == [False, False, False, True]
    with pytest.raises(ValueError, match="warmup"):
        G.capture(fwd, torch.ones(2), backend=G.FakeGraphBackend(), warmup=-1)


def test_timeline_lists_every_step_in_order():
    fwd, _ = make_model()
    x, a, b, meta = setup()
    g = G.capture(fwd, x, a, b, meta, backend=G.FakeGraphBackend(), warmup=0)
    g.replay(timeline=True)
    rows = g.last_timeline
    assert [r["kind"] for r in rows] == ["graph", "eager", "graph", "eager", "graph"]
    assert all(r["end_us"] >= r["start_us"] for r in rows)
    assert all(rows[i + 1]["start_us"] >= rows[i]["end_us"] for i in range(len(rows) - 1))
    assert [r["ops"] is None for r in rows] == [False, True, False, True, False]


def test_cuda_backend_needs_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(G.CaptureError, match="no CUDA"):
        G.CudaGraphBackend()
    assert isinstance(G.default_backend(), G.FakeGraphBackend)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_breakable_graph_matches_eager():
    fwd, ref = make_model()
    x, a, b, meta = (t.cuda() if isinstance(t, torch.Tensor) else t for t in setup(1024))
    g = G.capture(fwd, x, a, b, meta, backend=G.CudaGraphBackend(), warmup=2)
    assert (g.num_graphs, g.num_breaks) == (3, 2)
    gen = torch.Generator(device="cuda").manual_seed(3)
    for k in (0.25, -2.0, 7.0):
        meta.k = k
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        out = g.replay()
        torch.testing.assert_close(out, ref(x, meta), rtol=0, atol=0)
    assert math.isfinite(g.capture_s)

"""#43891: torch.ops wrappers vs direct calls -- same results bit for bit; the registration's schema, fake and
compile behaviour; op counts per forward. Timings are recorded by run(), never asserted."""
import importlib
import math

import pytest
import torch

from dsv4lab.lab import results
from dsv4lab.refactors import pr43891_op_registration as pr


@pytest.fixture(scope="module")
def inp():
    pr.prepare("cpu")
    return pr.make_inputs("toy", tokens=3, device="cpu", seed=1)


def test_ops_have_mutating_schemas_with_no_return():
    for name in ("attention_core", "fp8_einsum", "moe_experts"):
        for op in (name, f"{name}_probe"):
            schema = getattr(torch.ops.dsv4lab, op).default._schema
            mutated = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]
            assert mutated == ["out"], (op, mutated)
            assert len(schema.returns) == 0


@pytest.mark.parametrize("op", pr.OPS)
def test_each_op_before_equals_after_bitwise(inp, op):
    before, after = pr.op_calls(inp)[op]
    b, a = before(), after()
    assert b.dtype == a.dtype == torch.bfloat16 and b.shape == a.shape
    assert torch.isfinite(b.float()).all() and b.float().abs().sum() > 0     # real work, not an unwritten buffer
    assert torch.equal(b, a)


def test_layer_step_before_equals_after_bitwise(inp):
    (attn_b, moe_b), (attn_a, moe_a) = pr.before(inp), pr.after(inp)
    assert attn_b.shape == (3, 256) and moe_b.shape == (3, 256)               # toy hidden size
    assert torch.equal(attn_b, attn_a) and torch.equal(moe_b, moe_a)


def test_the_ops_run_the_wrapped_implementations(inp):
    """The registered ops compute what the dsv4lab references compute (not just before == after)."""
    from dsv4lab.kernels.reference.attention import sparse_attention_with_sink
    from dsv4lab.kernels.reference.moe import moe

    o = torch.full(tuple(inp.q.shape), float("nan"), dtype=torch.bfloat16)   # poisoned out, written in place
    assert torch.ops.dsv4lab.attention_core(inp.q, inp.kv, inp.idx, o, inp.attention.name) is None
    want = sparse_attention_with_sink(inp.q, inp.kv, inp.idx, inp.attention.sink, inp.attention.scale)
    assert torch.equal(o, want)
    y = torch.full(tuple(inp.x_moe.shape), float("nan"), dtype=torch.bfloat16)
    torch.ops.dsv4lab.moe_experts(inp.x_moe, inp.topk_weights, inp.topk_ids, y, inp.experts.name, inp.activation_clamp)
    e = inp.experts
    assert torch.equal(y, moe(inp.x_moe, inp.topk_weights, inp.topk_ids, e.w1, e.w3, e.w2,
                              swiglu_limit=inp.activation_clamp))


def test_fake_impl_only_describes_shapes(inp):
    """Under FakeTensorMode the op runs its fake (no layer lookup, no work): what let Dynamo treat it as one node."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        q, kv, idx = (mode.from_tensor(t) for t in (inp.q, inp.kv, inp.idx))
        out = torch.empty(q.shape, dtype=torch.bfloat16)
        assert torch.ops.dsv4lab.attention_core(q, kv, idx, out, "no.such.layer") is None
    with pytest.raises(KeyError, match="no.such.layer"):                        # the real impl would look it up
        torch.ops.dsv4lab.attention_core(inp.q, inp.kv, inp.idx, torch.empty_like(inp.q), "no.such.layer")


def test_einsum_rejects_other_equations_and_recipes_through_both_paths(inp):
    a, sa = pr._einsum_operands(inp)
    z = torch.empty(3, 2, 128, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="equation/recipe"):
        pr.fp8_einsum("bhd,hdr->bhr", (a, sa), (inp.wo_a_q, inp.wo_a_scale), z)
    with pytest.raises(ValueError, match="equation/recipe"):
        torch.ops.dsv4lab.fp8_einsum(a, sa, inp.wo_a_q, inp.wo_a_scale, z, pr.EQUATION, [1, 1, 128])


def test_op_calls_per_forward_are_layers_times_ops_per_layer():
    assert pr.ops_per_forward("flash") == {"attention_core": 43, "fp8_einsum": 43}           # 86 calls
    assert sum(pr.ops_per_forward("flash", mega_moe=True).values()) == 129
    assert sum(pr.ops_per_forward("pro").values()) == 122
    assert sum(pr.ops_per_forward("pro", mega_moe=True).values()) == 183                       # refactors.md 4.c
    with pytest.raises(ValueError, match="preset"):
        pr.ops_per_forward("toy")


def test_fullgraph_compile_traces_the_registered_op_and_breaks_on_an_opaque_call(inp):
    """CPU: the before path compiles into one graph (the op is one node, shape from the fake) and matches eager
    bit for bit. The after path reaches the reference einsum, plain torch, which Dynamo can also trace; the
    opaque stand-in for DeepGEMM's pybind call cannot be traced, so fullgraph fails there."""
    res = pr.compile_outcomes(inp)
    assert res["before"]["compiled"] and res["before"]["bitwise_equal"]
    assert res["after"]["compiled"]                                   # plain-torch reference: traceable
    opaque = res["after_opaque_standin"]
    assert not opaque["compiled"] and opaque["error"]
    assert opaque["graph_breaks"] >= 1


def test_run_quick_writes_valid_records():
    recs = pr.run("cpu", quick=True, preset="flash")
    for r in recs:
        assert results.validate(r) is None, r
        assert r["experiment"] == pr.EXPERIMENT
    bitwise = [r for r in recs if r["metric"] == "bitwise_equal"]
    assert {r["op"] for r in bitwise} == {"attention_core", "fp8_einsum", "moe_experts", "layer_step"}
    assert all(r["value"] is True for r in bitwise)
    overhead = {(r["op"], r["variant"]) for r in recs if r["metric"] == "host_overhead"}
    assert overhead == {(op, v) for op in pr.OPS for v in ("before", "after")}
    per_fwd = [r for r in recs if r["metric"] == "host_overhead_per_forward"]
    assert {(r["preset"], r["calls"]) for r in per_fwd} == {("flash", 86), ("flash", 129), ("pro", 122), ("pro", 183)}
    assert all(math.isfinite(r["value"]) for r in per_fwd)
    assert any(r["metric"] == "unavailable" and r["reason"] for r in recs)    # graph replay needs a GPU


def test_reload_replaces_the_registrations():
    mod = importlib.reload(pr)
    mod.prepare("cpu")
    inp = mod.make_inputs("toy", tokens=2, device="cpu", seed=2)
    b, a = mod.op_calls(inp)["attention_core"]
    assert torch.equal(b(), a())                      # the op reaches the reloaded module's layer registry

"""#44367 (inline _run_mega_moe): before/after are the same computation bit for bit; EPLB mapping; MegaMoE gating."""
import ast
import inspect
import textwrap

import pytest
import torch

from dsv4lab.kernels import registry
from dsv4lab.kernels.deep_gemm import mega_moe as mm
from dsv4lab.kernels.reference.moe import moe_fp4
from dsv4lab.lab.numerics import rel_rms
from dsv4lab.quant import quant_fp8, ue8m0_to_float
from dsv4lab.refactors import pr44367_megamoe as pr


@pytest.fixture(scope="module")
def case():
    return pr.make_case("toy", 6, seed=3)


def test_before_after_bitwise_with_eplb_and_equal_to_the_reference(case):
    mb, ma = pr.modules_for(case, "reference", n_redundant=3)
    args = (case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    yb, ya = pr.before(mb, *args), pr.after(ma, *args)
    assert ya.dtype == torch.bfloat16 and ya.shape == case.h.shape
    assert torch.equal(yb, ya)
    assert torch.equal(mb.eplb.expert_load_view, ma.eplb.expert_load_view)
    assert int(ma.eplb.expert_load_view.sum()) == case.topk_ids.numel()
    # the stand-in kernel is the reference MoE on the staged (fp8 1x128) activations, EPLB undone by p % E
    want = moe_fp4(pr.staged_x(case), case.topk_w, case.topk_ids, *case.weights, swiglu_limit=case.swiglu_limit)
    assert torch.equal(ya, want.to(torch.bfloat16))
    # and it is the MoE: within the fp32-vs-fp64 noise of the oracle, far below the bf16 output rounding
    y64 = pr.oracle64(pr.staged_x(case), case.topk_w, case.topk_ids, *case.weights, swiglu_limit=case.swiglu_limit)
    assert rel_rms(ya, y64) < 2.0 ** -8


def test_inlined_forward_holds_the_private_method_statements():
    """After = the private method's body moved into forward (same statements, same order), and no method left."""
    assert hasattr(pr.MegaMoEExpertsBefore, "_run_mega_moe") and not hasattr(pr.MegaMoEExpertsAfter, "_run_mega_moe")

    def body(fn):
        """The function's statements, normalised by the ast round trip (layout and comments drop out)."""
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
        return [ast.unparse(stmt) for stmt in tree.body[0].body]

    private = body(pr.MegaMoEExpertsBefore._run_mega_moe)
    inlined = body(pr.MegaMoEExpertsAfter.forward)
    positions = [inlined.index(s) for s in private]
    assert positions == sorted(positions) and inlined[-1] == "return y"
    assert "self._run_mega_moe(h, topk_w, topk_ids, y, activation_clamp, fast_math)" in body(pr.MegaMoEExpertsBefore.forward)
    assert not any("_run_mega_moe" in stmt for stmt in inlined)


def test_eplb_map_hand_computed():
    state = pr.initial_eplb_state(4, 2)
    assert state.logical_to_physical_map.tolist() == [[0, 4], [1, 5], [2, -1], [3, -1]]
    assert state.logical_replica_count.tolist() == [2, 2, 1, 1]
    phys = pr.eplb_map_to_physical_and_record(torch.tensor([[0, 1], [0, 2]]), state)
    # positions 0..3: id 0 -> replica 0 -> 0; id 1 -> replica 1 -> 5; id 0 -> replica 0 -> 0; id 2 -> 2
    assert phys.tolist() == [[0, 5], [0, 2]]
    assert state.expert_load_view.tolist() == [2, 0, 1, 0, 0, 1]
    assert bool(((phys % 4) == torch.tensor([[0, 1], [0, 2]])).all())   # p % E recovers the logical expert


def test_buffer_cache_and_token_limit(case):
    mb, ma = pr.modules_for(case, "fixed", max_num_tokens=8)
    assert mb.get_symm_buffer() is ma.get_symm_buffer()              # one buffer per (group, device, shape)
    big = torch.zeros(9, case.hidden, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="max_num_tokens"):
        pr.after(ma, big, torch.zeros(9, case.top_k), torch.zeros(9, case.top_k, dtype=torch.int64), 10.0)
    with pytest.raises(ValueError, match="kernel"):
        pr.MegaMoEExpertsAfter(case.weights, top_k=2, max_num_tokens=4, kernel="nope")
    # the fixed-cost stand-in returns the staged e4m3 codes (unscaled): before and after stage the same bytes
    y = pr.after(ma, case.h, case.topk_w, case.topk_ids, case.swiglu_limit)
    assert torch.equal(y, pr.before(mb, case.h, case.topk_w, case.topk_ids, case.swiglu_limit))
    assert torch.equal(y, quant_fp8(case.h, 128)[0].to(torch.bfloat16))


def test_run_on_cpu_records():
    recs = pr.run("cpu", quick=True)
    by = lambda **kw: [r for r in recs if all(r.get(k) == v for k, v in kw.items())]  # noqa: E731
    assert all(r["value"] is True for r in by(metric="bitwise_equal", variant="after_vs_before"))
    assert len(by(metric="bitwise_equal", variant="after_vs_before")) == 2
    assert all(r["value"] > 0 for r in by(metric="host_overhead"))
    assert {r["variant"] for r in by(metric="unavailable")} >= {"grouped_fp8", "fp8_fp4_mega_moe", "fp8_mega_moe_sm90"}
    assert all(r["reason"] for r in by(metric="unavailable"))
    assert all(r["experiment"] == pr.EXPERIMENT for r in recs) and not by(metric="error")


def test_sm100_path_is_gated_with_a_clear_message():
    if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 10:
        pytest.skip("an SM100 GPU is present")
    with pytest.raises(mm.MegaMoEUnavailable, match="SM100"):
        mm.require_sm100()
    ok, why = registry.availability("mega_moe", "deep_gemm")
    assert not ok and why
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.zeros(2, 256, dtype=torch.bfloat16, device=dev)
    # raised before deep_gemm is imported: CPU tensors are refused first (the argument), then a non-SM100 GPU
    err = (mm.MegaMoEUnavailable, "SM100") if dev == "cuda" else (ValueError, "x: .*CUDA")
    with pytest.raises(err[0], match=err[1]):
        mm.mega_moe(x, torch.ones(2, 2, device=dev), torch.zeros(2, 2, dtype=torch.int64, device=dev),
                    *(w.to(dev) for w in pr.make_weights(2, 256, 128)), swiglu_limit=10.0)
    b = torch.arange(1, 255, dtype=torch.uint8)
    assert torch.equal(mm.ue8m0_bytes_to_fp32(b), ue8m0_to_float(b))

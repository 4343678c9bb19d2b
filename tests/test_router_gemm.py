"""Op ``router_gemm``: bf16 x bf16 -> fp32 GEMM. Reference vs fp64, the torch after-path (CPU fallback, meta
shapes), the shared input contract, and the cuBLAS extension builder (toolchain search, commands, caching,
failure reasons; a slow test compiles the C++ source with nvcc against this torch's headers)."""
from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

from dsv4lab.kernels import registry
from dsv4lab.kernels.cuda import cublas_gemm as cg
from dsv4lab.kernels.reference.router_gemm import fp32_accumulation_bound, router_gemm
from dsv4lab.kernels.torch import mm_fp32

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(m: int, n: int, k: int, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(m, k)                           # unit-RMS activations
    w = torch.randn(n, k) / math.sqrt(k)            # weights ~ N(0, 1/K)
    return x.to(device, torch.bfloat16), w.to(device, torch.bfloat16)


# ---- reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,n,k", [(1, 64, 1024), (17, 96, 2048), (64, 256, 4096)])
def test_reference_within_fp32_accumulation_bound(m: int, n: int, k: int) -> None:
    x, w = _inputs(m, n, k)
    out = router_gemm(x, w)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    exact = x.double() @ w.double().T  # bf16 products and sums of 4096 of them are exact enough in fp64
    err = (out.double() - exact).abs()
    bound = fp32_accumulation_bound(x, w)
    assert bool((err <= bound).all()), float((err / bound).max())
    # not trivially exact either: fp32 accumulation leaves a visible error somewhere
    assert float(err.max()) > 0


def test_reference_hand_case() -> None:
    x = torch.tensor([[1.0, 2.0], [-0.5, 0.25]], dtype=torch.bfloat16)
    w = torch.tensor([[3.0, 4.0], [5.0, 6.0], [0.0, -8.0]], dtype=torch.bfloat16)
    expected = torch.tensor([[11.0, 17.0, -16.0], [-0.5, -1.0, -2.0]])
    assert torch.equal(router_gemm(x, w), expected)


def test_reference_rejects_bad_inputs() -> None:
    x, w = _inputs(4, 8, 32)
    with pytest.raises(ValueError, match="weight"):
        router_gemm(x, w[:, :16])
    with pytest.raises(ValueError, match="x"):
        router_gemm(x[0], w)
    with pytest.raises(TypeError, match="x"):
        router_gemm(x.to(torch.int32), w)


def test_reference_empty_tokens() -> None:
    x, w = _inputs(0, 8, 32)
    out = router_gemm(x, w)
    assert out.shape == (0, 8) and out.dtype == torch.float32


# ---- torch after path -----------------------------------------------------------------------------
def test_mm_fp32_cpu_fallback_is_labelled_fp32_upcast() -> None:
    x, w = _inputs(8, 64, 512)
    out = mm_fp32.mm_fp32(x, w)
    assert out.dtype == torch.float32
    assert torch.equal(out, torch.mm(x.float(), w.float().T))
    assert "CPU fallback" in mm_fp32.path_label("cpu")
    assert mm_fp32.path_label("cuda") == mm_fp32.AFTER_CALL


def test_after_call_on_meta_tensors_gives_fp32_shape() -> None:
    # aten::mm.dtype has no CPU kernel, but its meta function runs here: checks the call's shape/dtype contract.
    x = torch.empty(5, 64, dtype=torch.bfloat16, device="meta")
    w = torch.empty(32, 64, dtype=torch.bfloat16, device="meta")
    out = torch.mm(x, w.T, out_dtype=torch.float32)
    assert out.shape == (5, 32) and out.dtype == torch.float32


def test_torch_backend_rejects_cpu_tensors_before_launch() -> None:
    x, w = _inputs(2, 8, 32)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        mm_fp32.router_gemm_torch(x, w)


@pytest.mark.parametrize("case,exc,name", [
    ("x_fp32", TypeError, "x"), ("w_fp16", TypeError, "weight"), ("x_3d", ValueError, "x"),
    ("w_noncontig", ValueError, "weight"), ("k_mismatch", ValueError, "weight"), ("x_list", TypeError, "x"),
])
def test_contract_names_the_argument(case: str, exc: type, name: str) -> None:
    x, w = _inputs(4, 16, 64)
    bad = {"x_fp32": (x.float(), w), "w_fp16": (x, w.half()), "x_3d": (x[None], w),
           "w_noncontig": (x, torch.randn(64, 16).to(torch.bfloat16).T), "k_mismatch": (x, w[:, :32]),
           "x_list": (x.tolist(), w)}[case]
    with pytest.raises(exc, match=f"^{name}:"):
        mm_fp32.check_bf16_gemm_inputs(*bad, require_cuda=False)


def test_cublas_backend_checks_inputs_before_any_build(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_build():
        raise AssertionError("the extension must not be built for inputs that fail the contract")

    monkeypatch.setattr(cg, "gemm_op", no_build)
    x, w = _inputs(2, 8, 32)
    with pytest.raises(ValueError, match="CUDA tensor"):
        cg.router_gemm_cublas(x, w)
    with pytest.raises(TypeError, match="weight"):
        cg.router_gemm_cublas(x, w.float())


def test_registry_lists_three_backends_with_reasons() -> None:
    assert registry.backends("router_gemm") == ["reference", "torch", "cuda"]
    assert registry.availability("router_gemm", "reference") == (True, "")
    if not torch.cuda.is_available():
        for b in ("torch", "cuda"):
            ok, why = registry.availability("router_gemm", b)
            assert not ok and why
    x, w = _inputs(3, 8, 32)
    assert torch.equal(registry.get("router_gemm", "reference")(x, w), router_gemm(x, w))


# ---- extension builder ----------------------------------------------------------------------------
@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> dict:
    state = {"info": None, "error": None}
    monkeypatch.setattr(cg, "_state", state)
    return state


def _hide_nvcc(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None, raising=False)
    monkeypatch.setattr(cg.shutil, "which", lambda name: None)
    monkeypatch.setattr(cg, "_DEFAULT_CUDA_HOMES", ())


def test_missing_nvcc_is_a_clear_reason_not_a_crash(monkeypatch: pytest.MonkeyPatch, fresh_state: dict) -> None:
    _hide_nvcc(monkeypatch)
    monkeypatch.setattr(cg, "_op_registered", lambda: False)
    with pytest.raises(cg.ExtensionUnavailable, match="nvcc not found"):
        cg.find_toolchain()
    ok, why = cg.status()
    assert not ok and "nvcc not found" in why
    monkeypatch.setattr(cg, "_torch_problem", lambda: None)  # as on a CUDA build of torch
    with pytest.raises(cg.ExtensionUnavailable, match="nvcc not found"):
        cg.build()
    # the failure is remembered: no second attempt, same message, status says it too
    assert "nvcc not found" in fresh_state["error"]
    with pytest.raises(cg.ExtensionUnavailable, match="nvcc not found"):
        cg.build()
    assert cg.status() == (False, fresh_state["error"])


def test_missing_cublas_headers_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (home / "include").mkdir()
    (home / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (home / "include" / "cuda_runtime_api.h").write_text("")
    monkeypatch.setenv("CUDA_HOME", str(home))
    monkeypatch.delenv("DSV4LAB_CUDA_INCLUDE", raising=False)
    monkeypatch.setattr(cg.shutil, "which", lambda name: None)
    monkeypatch.setattr(cg, "_wheel_cuda_roots", lambda: [])
    with pytest.raises(cg.ExtensionUnavailable) as info:
        cg.find_toolchain()
    msg = str(info.value)
    assert "cublas_v2.h" in msg and "cusparse.h" in msg and "cuda_runtime_api.h" not in msg.split("]")[0]


def test_build_root_honours_torch_extensions_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert cg.build_root() == tmp_path / "dsv4lab"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    assert cg.build_root() == Path.home() / ".cache" / "dsv4lab" / "torch_extensions"


def test_build_root_falls_back_to_temp_when_not_writable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cg.os, "access", lambda path, mode: False)
    root = cg.build_root()
    assert root.parent == Path(tempfile.gettempdir()) and "dsv4lab" in root.name


def _fake_toolchain() -> cg.Toolchain:
    return cg.Toolchain(nvcc="/opt/cuda/bin/nvcc", cuda_home="/opt/cuda",
                        include_dirs=("/opt/cuda/include", "/wheels/nvidia/cu13/include"),
                        library_flags=("-L/wheels/nvidia/cu13/lib", "-l:libcublas.so.13",
                                       "-Xlinker=-rpath=/wheels/nvidia/cu13/lib", "-lcudart"))


def test_direct_build_commands() -> None:
    from torch.utils.cpp_extension import include_paths

    tc = _fake_toolchain()
    comp, link = cg.direct_build_commands(tc, "s.cu", "s.o", "s.so", cxx_std="c++20")
    assert comp[:5] == ["/opt/cuda/bin/nvcc", "-c", "s.cu", "-o", "s.o"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    for flag in ("-std=c++20", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "--expt-relaxed-constexpr",
                 "-I/opt/cuda/include", "-I/wheels/nvidia/cu13/include", *(f"-I{p}" for p in include_paths())):
        assert flag in comp, flag
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    assert link[:5] == ["/opt/cuda/bin/nvcc", "-shared", "s.o", "-o", "s.so"]
    for flag in (f"-L{torch_lib}", "-lc10", "-lc10_cuda", "-ltorch", "-ltorch_cpu", "-ltorch_cuda",
                 "-l:libcublas.so.13", f"-Xlinker=-rpath={torch_lib}", *tc.library_flags):
        assert flag in link, flag


def test_direct_route_reuses_a_cached_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def fake_run(cmd: list[str], what: str) -> None:
        calls.append(cmd)
        Path(cmd[cmd.index("-o") + 1]).write_bytes(b"\x7fELF")  # the output the real tool would write

    monkeypatch.setattr(cg, "find_toolchain", _fake_toolchain)
    monkeypatch.setattr(cg, "_run_checked", fake_run)
    lib1, compiled1, _ = cg._build_direct(tmp_path, verbose=False)
    assert compiled1 and len(calls) == 2 and Path(lib1).is_file()
    lib2, compiled2, notes = cg._build_direct(tmp_path, verbose=False)
    assert lib2 == lib1 and not compiled2 and len(calls) == 2 and "reused" in notes[0]


def test_direct_route_retries_with_cxx17_then_reports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[str] = []

    def failing_run(cmd: list[str], what: str) -> None:
        seen.append(next(f for f in cmd if f.startswith("-std=")) if "-c" in cmd else "link")
        raise cg.ExtensionUnavailable(f"{what} failed (exit 1): boom")

    monkeypatch.setattr(cg, "find_toolchain", _fake_toolchain)
    monkeypatch.setattr(cg, "_run_checked", failing_run)
    with pytest.raises(cg.ExtensionUnavailable, match="direct nvcc build failed.*boom"):
        cg._build_direct(tmp_path, verbose=False)
    assert seen == ["-std=c++20", "-std=c++17"]


def test_build_takes_direct_route_without_ninja(monkeypatch: pytest.MonkeyPatch, fresh_state: dict,
                                               tmp_path: Path) -> None:
    registered = {"now": False}
    loaded: list[str] = []
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cg, "_torch_problem", lambda: None)
    monkeypatch.setattr(cg, "_ninja_reason", lambda: "ninja not found (torch's load_inline needs it)")
    monkeypatch.setattr(cg, "_build_load_inline", lambda *a: pytest.fail("load_inline must not run"))
    monkeypatch.setattr(cg, "_build_direct", lambda root, verbose: (str(root / "x.so"), True, []))
    monkeypatch.setattr(cg, "_op_registered", lambda: registered["now"])

    def fake_load(path: str) -> None:
        loaded.append(path)
        registered["now"] = True

    monkeypatch.setattr(cg.torch.ops, "load_library", fake_load)
    info = cg.build()
    assert info.route == "nvcc-direct" and info.compiled and loaded == [str(tmp_path / "dsv4lab" / "x.so")]
    assert any("ninja" in n for n in info.notes)
    assert cg.build() is info  # cached in-process
    assert cg.status() == (True, "")


def _cuda_cmake_macros_shim(torch_include: Path, tmp: Path) -> tuple[str, ...]:
    """CPU wheels of torch omit c10/cuda/impl/cuda_cmake_macros.h, a header CMake generates for CUDA builds;
    its content for a shared-library build is one define. Supply it only when torch lacks it."""
    if (torch_include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").is_file():
        return ()
    shim = tmp / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return (str(tmp / "shim"),)


@pytest.mark.slow
def test_cuda_source_compiles_with_nvcc(tmp_path: Path) -> None:
    """Compile (no link: a CPU torch has no libtorch_cuda) CUDA_SOURCE with the direct route's command."""
    try:
        tc = cg.find_toolchain()
    except cg.ExtensionUnavailable as e:
        pytest.skip(f"cannot compile here: {e}")
    from torch.utils.cpp_extension import include_paths

    extra = _cuda_cmake_macros_shim(Path(include_paths()[0]), tmp_path)
    src = tmp_path / "gemm.cu"
    src.write_text(cg.CUDA_SOURCE)
    comp, _ = cg.direct_build_commands(tc, src, tmp_path / "gemm.o", tmp_path / "gemm.so",
                                       extra_include_dirs=extra)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(comp, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.skip("nvcc compile took over 240 s on this machine")
    assert proc.returncode == 0, proc.stderr[-3000:]
    if shutil.which("nm"):
        symbols = subprocess.run(["nm", str(tmp_path / "gemm.o")], capture_output=True, text=True).stdout
        assert "U cublasGemmEx" in symbols and "cublasSetStream" in symbols
        assert "TORCH_LIBRARY_init_dsv4lab_cublas" in subprocess.run(
            ["nm", "-C", str(tmp_path / "gemm.o")], capture_output=True, text=True).stdout
    print(f"nvcc compile: {time.perf_counter() - t0:.1f} s")


# ---- on a GPU -------------------------------------------------------------------------------------
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("m", [1, 7, 256])
def test_gpu_backends_within_fp32_bound(m: int) -> None:
    x, w = _inputs(m, 256, 4096, "cuda")
    exact = x.double() @ w.double().T
    bound = fp32_accumulation_bound(x, w)
    for backend in ("reference", "torch", "cuda"):
        ok, why = registry.availability("router_gemm", backend)
        if not ok:
            pytest.skip(f"{backend}: {why}")
        out = registry.get("router_gemm", backend)(x, w)
        assert out.dtype == torch.float32 and out.shape == (m, 256)
        assert bool(((out.double() - exact).abs() <= bound).all()), backend


@pytest.mark.gpu
@needs_cuda
def test_gpu_cublas_op_follows_side_stream_and_graph_capture() -> None:
    ok, why = registry.availability("router_gemm", "cuda")
    if not ok:
        pytest.skip(why)
    fn = registry.get("router_gemm", "cuda")
    x, w = _inputs(64, 512, 4096, "cuda")
    expected = fn(x, w)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        on_side = fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(on_side, expected)
    with torch.cuda.stream(side):
        fn(x, w)  # warm-up on the capture stream
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(x, w)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, expected)
    assert cg.router_gemm_cublas(x[:0], w).shape == (0, 512)

"""The "before" path of vLLM PR #41300: a custom torch op calling ``cublasGemmEx`` bf16 x bf16 -> fp32.

    out[m, n] = sum_k x[m, k] * weight[n, k]      x [M, K] bf16, weight [N, K] bf16 -> out [M, N] fp32

cuBLAS is column-major, so the row-major product ``Out = X W^T`` is computed as the column-major
``Out^T [N, M] = W [K, N]^T X [K, M]`` (refactors.md 2.a)::

    cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, m=N, n=M, k=K, &alpha,
                 W, CUDA_R_16BF, lda=K, X, CUDA_R_16BF, ldb=K, &beta,
                 Out, CUDA_R_32F, ldc=N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP)

with the handle from ``at::cuda::getCurrentCUDABlasHandle()`` bound to the current stream, so the op runs on
side streams and inside CUDA-graph capture like any ATen op. It is registered with ``TORCH_LIBRARY`` as
``torch.ops.dsv4lab_cublas.gemm_bf16_bf16_fp32`` and so goes through the dispatcher, as vLLM's
``torch.ops._moe_C.router_gemm_bf16_fp32`` did.

Building (``build``) happens once per process, at the first call, never at import:
1. ``torch.utils.cpp_extension.load_inline`` (needs ninja) into ``<root>/load_inline``;
2. if ninja is missing or that build fails, nvcc is called directly (``direct_build_commands``) to produce
   ``<root>/nvcc_direct/<name>_<hash>.so``, loaded with ``torch.ops.load_library``.
``<root>`` is ``$TORCH_EXTENSIONS_DIR/dsv4lab`` if set, else ``~/.cache/dsv4lab/torch_extensions``. A second
process reuses the build (ninja sees no change; the direct route finds its hashed ``.so``). Headers that
``ATen/cuda/CUDAContext.h`` pulls in (cuBLAS, cuSPARSE, cuSOLVER) are searched in ``$DSV4LAB_CUDA_INCLUDE``,
the CUDA toolkit and the ``nvidia/cu13`` pip wheels. Anything missing is reported by ``status()`` and raised as
``ExtensionUnavailable`` with the reason.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..torch.mm_fp32 import check_bf16_gemm_inputs

LIBRARY = "dsv4lab_cublas"
OP_NAME = "gemm_bf16_bf16_fp32"
EXTENSION_NAME = "dsv4lab_cublas_gemm"
_DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)
# torch's extension builder passes these to nvcc; its headers expect them (no implicit half/bf16 conversions).
_TORCH_NVCC_FLAGS = ("-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                     "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                     "--expt-relaxed-constexpr")
_REQUIRED_HEADERS = ("cuda_runtime_api.h", "cublas_v2.h", "cusparse.h", "cusolverDn.h")

CUDA_SOURCE = r"""
// bf16 x bf16 -> fp32 GEMM through cublasGemmEx, registered as torch.ops.dsv4lab_cublas.gemm_bf16_bf16_fp32.
#include <climits>

// Narrow ATen headers instead of <ATen/ATen.h>: half the compile time of the run-time build.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublas_v2.h>
#include <torch/library.h>

namespace {

at::Tensor gemm_bf16_bf16_fp32(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16, "x: expected bfloat16, got ", x.scalar_type());
  TORCH_CHECK(weight.scalar_type() == at::kBFloat16, "weight: expected bfloat16, got ", weight.scalar_type());
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2, "x, weight: expected 2-D tensors");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous(), "x, weight: expected contiguous tensors");
  TORCH_CHECK(x.device() == weight.device(), "weight: expected the device of x");
  TORCH_CHECK(x.size(1) == weight.size(1), "weight: expected [N, K] with K = x.size(1)");
  const int64_t M = x.size(0), N = weight.size(0), K = x.size(1);
  TORCH_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX, "x, weight: dimensions exceed the 32-bit cuBLAS API");

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();  // an empty sum; cuBLAS would also give beta * C = 0

  cublasHandle_t handle = at::cuda::getCurrentCUDABlasHandle();
  // The op must follow the caller's stream (aux streams, graph capture), as vLLM's router_gemm.cu did.
  // cublasSetStream also resets the handle's workspace to cuBLAS's default pool (cuBLAS docs), replacing the
  // workspace ATen configured; kept on purpose, since the original op did the same.
  TORCH_CUDABLAS_CHECK(cublasSetStream(handle, at::cuda::getCurrentCUDAStream()));
  const float alpha = 1.0f, beta = 0.0f;
  // Row-major Out[M,N] = X[M,K] W[N,K]^T is column-major Out^T[N,M] = (W as [K,N])^T (X as [K,M]).
  TORCH_CUDABLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N,
                                    static_cast<int>(N), static_cast<int>(M), static_cast<int>(K),
                                    &alpha,
                                    weight.data_ptr(), CUDA_R_16BF, static_cast<int>(K),
                                    x.data_ptr(), CUDA_R_16BF, static_cast<int>(K),
                                    &beta,
                                    out.data_ptr(), CUDA_R_32F, static_cast<int>(N),
                                    CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT_TENSOR_OP));
  return out;
}

}  // namespace

TORCH_LIBRARY(dsv4lab_cublas, m) {
  m.def("gemm_bf16_bf16_fp32(Tensor x, Tensor weight) -> Tensor");
}

TORCH_LIBRARY_IMPL(dsv4lab_cublas, CUDA, m) {
  m.impl("gemm_bf16_bf16_fp32", &gemm_bf16_bf16_fp32);
}
"""


class ExtensionUnavailable(RuntimeError):
    """The cuBLAS extension cannot be built or loaded here; the message says why."""


@dataclass(frozen=True)
class Toolchain:
    """What a direct nvcc build needs: the compiler, include dirs, and link flags for cuBLAS/cudart."""

    nvcc: str
    cuda_home: str | None
    include_dirs: tuple[str, ...]
    library_flags: tuple[str, ...]


@dataclass(frozen=True)
class BuildInfo:
    route: str                      # "load_inline" | "nvcc-direct" | "already-loaded"
    library_path: str | None
    build_dir: str
    seconds: float                  # wall time of build() including a cache check and the load
    compiled: bool                  # False when an earlier build was reused
    notes: tuple[str, ...] = field(default_factory=tuple)


# ---- locating the toolchain -----------------------------------------------------------------------
def build_root() -> Path:
    """``$TORCH_EXTENSIONS_DIR/dsv4lab`` if set, else ``~/.cache/dsv4lab/torch_extensions``; a temp folder if
    that cannot be created or written (a read-only home must not cost the build)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    root = Path(env) / "dsv4lab" if env else Path.home() / ".cache" / "dsv4lab" / "torch_extensions"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK):
            return root
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"dsv4lab_torch_extensions_{os.getuid()}"


def _cuda_home_candidates() -> list[Path]:
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils import cpp_extension

        cands.append(cpp_extension.CUDA_HOME)
    except Exception:  # cpp_extension import problems must not hide the other candidates
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(str(Path(nvcc).resolve().parent.parent))
    cands.extend(_DEFAULT_CUDA_HOMES)
    seen, out = set(), []
    for c in cands:
        if c and c not in seen and Path(c).is_dir():
            seen.add(c)
            out.append(Path(c))
    return out


def find_nvcc() -> tuple[str | None, str | None]:
    """(nvcc path, CUDA home) or (None, None). PATH first; a wrapper script on PATH is fine."""
    homes = [h for h in _cuda_home_candidates() if (h / "bin" / "nvcc").is_file()]
    on_path = shutil.which("nvcc")
    # /usr/local/bin/nvcc can be a wrapper script, making /usr/local look like a CUDA home: prefer a home
    # that also has the runtime headers.
    full = [h for h in homes if any((h / sub / "cuda_runtime_api.h").is_file()
                                    for sub in ("include", "targets/x86_64-linux/include"))]
    home = (full or homes or [None])[0]
    if home is None:
        return on_path, None
    return on_path or str(home / "bin" / "nvcc"), str(home)


def _wheel_cuda_roots() -> list[Path]:
    """``site-packages/nvidia/cu13`` etc. where the CUDA pip wheels that torch depends on put headers/libs."""
    spec = importlib.util.find_spec("nvidia")
    roots: list[Path] = []
    for base in (spec.submodule_search_locations or []) if spec else []:
        base = Path(base)
        roots += [base / "cu13", base / "cu12"]
        roots += sorted(p for p in base.iterdir() if p.is_dir() and p.name not in ("cu13", "cu12"))
    return [r for r in roots if r.is_dir()]


def _include_candidates(cuda_home: str | None) -> list[Path]:
    dirs = [Path(d) for d in os.environ.get("DSV4LAB_CUDA_INCLUDE", "").split(os.pathsep) if d]
    if cuda_home:
        dirs += [Path(cuda_home) / "include", Path(cuda_home) / "targets" / "x86_64-linux" / "include"]
    dirs += [r / "include" for r in _wheel_cuda_roots()]
    return [d for d in dirs if d.is_dir()]


def _find_library(stem: str, cuda_home: str | None) -> tuple[str, str] | None:
    """(dir, file name) of ``lib<stem>.so[.N]``; torch's own wheel libraries first (same soname gets reused)."""
    dirs = [r / "lib" for r in _wheel_cuda_roots()]
    if cuda_home:
        dirs += [Path(cuda_home) / "lib64", Path(cuda_home) / "targets" / "x86_64-linux" / "lib"]
    for d in dirs:
        if not d.is_dir():
            continue
        names = sorted(p.name for p in d.glob(f"lib{stem}.so*"))
        if names:
            return str(d), min(names, key=len)   # prefer libX.so, then libX.so.13
    return None


def find_toolchain() -> Toolchain:
    """Everything a direct build needs; raises ExtensionUnavailable naming what is missing and where it looked."""
    nvcc, cuda_home = find_nvcc()
    if nvcc is None:
        searched = ", ".join(str(p) for p in _cuda_home_candidates()) or "none"
        raise ExtensionUnavailable(
            "nvcc not found (not on PATH; CUDA homes searched: " + searched + "); the cuBLAS extension is "
            "compiled at run time: install the CUDA toolkit or set CUDA_HOME")
    candidates = _include_candidates(cuda_home)
    include_dirs, missing = [], []
    for header in _REQUIRED_HEADERS:
        hit = next((d for d in candidates if (d / header).is_file()), None)
        if hit is None:
            missing.append(header)
        elif str(hit) not in include_dirs:
            include_dirs.append(str(hit))
    if missing:
        raise ExtensionUnavailable(
            f"CUDA headers {missing} not found (searched {[str(d) for d in candidates]}); ATen/cuda/CUDAContext.h "
            "needs them: use a full CUDA toolkit, pip install nvidia-cublas nvidia-cusparse nvidia-cusolver, "
            "or point DSV4LAB_CUDA_INCLUDE at a folder that has them")
    flags: list[str] = []
    for stem in ("cublas", "cudart"):
        found = _find_library(stem, cuda_home)
        if found:
            d, name = found
            flags += [f"-L{d}", f"-l:{name}", f"-Xlinker=-rpath={d}"]
        else:
            flags.append(f"-l{stem}")  # leave it to the linker's default search path
    return Toolchain(nvcc, cuda_home, tuple(include_dirs), tuple(flags))


# ---- the direct nvcc route ------------------------------------------------------------------------
def _source_hash(extra: str = "") -> str:
    key = "\n".join([CUDA_SOURCE, torch.__version__, str(torch.version.cuda), sys.version, extra])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def direct_build_commands(tc: Toolchain, source: str | Path, obj: str | Path, library: str | Path,
                          cxx_std: str = "c++20", extra_include_dirs: tuple[str, ...] = ()
                          ) -> tuple[list[str], list[str]]:
    """(compile, link) commands that turn ``source`` into ``obj`` and then the loadable ``library``.

    Compile flags follow what torch's own extension builder passes: the C++ standard, -fPIC, the CXX11 ABI flag
    of this torch build and torch's include dirs. The link step names torch's CUDA libraries explicitly so the
    shared object loads without relying on symbols being global.
    """
    from torch.utils.cpp_extension import include_paths

    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", 1))
    compile_cmd = [tc.nvcc, "-c", str(source), "-o", str(obj), f"-std={cxx_std}", "-O2",
                   "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
                   f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}", *_TORCH_NVCC_FLAGS]
    compile_cmd += [f"-I{d}" for d in [*include_paths(), *tc.include_dirs, *extra_include_dirs]]
    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    link_cmd = [tc.nvcc, "-shared", str(obj), "-o", str(library), f"-L{torch_lib}",
                "-lc10", "-lc10_cuda", "-ltorch_cpu", "-ltorch_cuda", "-ltorch", *tc.library_flags,
                f"-Xlinker=-rpath={torch_lib}"]
    return compile_cmd, link_cmd


def _run_checked(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise ExtensionUnavailable(f"{what} failed (exit {proc.returncode}): {' '.join(cmd[:4])} ...\n{tail}")


def _build_direct(root: Path, verbose: bool) -> tuple[str, bool, list[str]]:
    """Compile (unless a matching .so exists) and return (library path, compiled?, notes)."""
    tc = find_toolchain()
    out_dir = root / "nvcc_direct"
    out_dir.mkdir(parents=True, exist_ok=True)
    library = out_dir / f"{EXTENSION_NAME}_{_source_hash(' '.join(tc.include_dirs + tc.library_flags))}.so"
    if library.is_file():
        return str(library), False, [f"reused {library.name}"]
    source = out_dir / f"{library.stem}.cu"
    source.write_text(CUDA_SOURCE)
    notes, last_error = [], None
    for std in ("c++20", "c++17"):  # torch >= 2.10 headers need C++20; older toolchains may only do C++17
        tmp = out_dir / f"{library.stem}.{os.getpid()}.tmp.so"
        compile_cmd, link_cmd = direct_build_commands(tc, source, out_dir / f"{library.stem}.o", tmp, std)
        try:
            if verbose:
                print(" ".join(compile_cmd), "\n", " ".join(link_cmd), file=sys.stderr)
            _run_checked(compile_cmd, f"nvcc compile (-std={std})")
            _run_checked(link_cmd, "nvcc link")
        except ExtensionUnavailable as e:
            last_error = e
            notes.append(str(e).splitlines()[0])
            continue
        os.replace(tmp, library)  # atomic: a concurrent process sees either no file or a complete one
        return str(library), True, notes
    raise ExtensionUnavailable(f"direct nvcc build failed: {last_error}")


# ---- the load_inline route ------------------------------------------------------------------------
def _ninja_reason() -> str | None:
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError as e:
        return f"torch.utils.cpp_extension unavailable: {e}"
    return None if is_ninja_available() else "ninja not found (torch's load_inline needs it)"


def _build_load_inline(root: Path, verbose: bool) -> tuple[str, bool]:
    from torch.utils.cpp_extension import load_inline

    tc = find_toolchain()
    build_dir = root / "load_inline"
    build_dir.mkdir(parents=True, exist_ok=True)
    library = build_dir / f"{EXTENSION_NAME}.so"
    before = library.stat().st_mtime_ns if library.is_file() else None
    kwargs = {}
    if "no_implicit_headers" in inspect.signature(load_inline).parameters:
        kwargs["no_implicit_headers"] = True  # main.cpp stays empty: no torch/extension.h compile (~20 s)
    load_inline(name=EXTENSION_NAME, cpp_sources=[""], cuda_sources=[CUDA_SOURCE], functions=None,
                extra_cuda_cflags=["-O2"], extra_ldflags=[f.replace("-Xlinker=", "-Wl,") for f in tc.library_flags],
                extra_include_paths=list(tc.include_dirs), build_directory=str(build_dir), verbose=verbose,
                with_cuda=True, is_python_module=False, **kwargs)
    after = library.stat().st_mtime_ns if library.is_file() else None
    return str(library), before is None or before != after


# ---- build + op -----------------------------------------------------------------------------------
_state: dict[str, object] = {"info": None, "error": None}


def _op_registered() -> bool:
    try:
        getattr(getattr(torch.ops, LIBRARY), OP_NAME)
        return True
    except (AttributeError, RuntimeError):
        return False


def _torch_problem() -> str | None:
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the cuBLAS extension needs a CUDA build of torch"
    return None


def status() -> tuple[bool, str]:
    """(can run here, reasons if not). Cheap: looks for torch CUDA, a GPU and the toolchain; compiles nothing."""
    if isinstance(_state["info"], BuildInfo):
        return True, ""
    if _state["error"]:
        return False, str(_state["error"])
    reasons = []
    if _torch_problem():
        reasons.append(_torch_problem())
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU visible to torch")
    if not _op_registered():
        try:
            find_toolchain()
        except ExtensionUnavailable as e:
            reasons.append(str(e))
    return (not reasons), "; ".join(reasons)


def build(verbose: bool = False, retry: bool = False) -> BuildInfo:
    """Build (or reuse) and load the extension once per process; raises ExtensionUnavailable with the reason.

    A failure is remembered: later calls raise the same error without recompiling unless ``retry``.
    """
    if isinstance(_state["info"], BuildInfo):
        return _state["info"]
    if _state["error"] and not retry:
        raise ExtensionUnavailable(str(_state["error"]))
    t0 = time.perf_counter()
    root = build_root()
    try:
        if _op_registered():  # loaded earlier in this process by another route
            info = BuildInfo("already-loaded", None, str(root), time.perf_counter() - t0, False)
        else:
            problem = _torch_problem()
            if problem:
                find_toolchain()  # a missing nvcc is the more useful message when both are wrong
                raise ExtensionUnavailable(problem)
            notes: list[str] = []
            route, library, compiled = None, None, False
            why_not_ninja = _ninja_reason()
            if why_not_ninja is None:
                try:
                    library, compiled = _build_load_inline(root, verbose)
                    route = "load_inline"
                except Exception as e:  # fall through to the direct route with the reason kept
                    if _op_registered():
                        raise
                    notes.append(f"load_inline failed: {type(e).__name__}: {str(e).strip()[-400:]}")
            else:
                notes.append(why_not_ninja)
            if route is None:
                library, compiled, more = _build_direct(root, verbose)
                notes += more
                torch.ops.load_library(library)
                route = "nvcc-direct"
            if not _op_registered():
                raise ExtensionUnavailable(f"built {library} but torch.ops.{LIBRARY}.{OP_NAME} is not registered")
            info = BuildInfo(route, library, str(root), time.perf_counter() - t0, compiled, tuple(notes))
    except ExtensionUnavailable as e:
        _state["error"] = str(e)
        raise
    except Exception as e:  # anything else (e.g. a load error) is also a build failure to report
        _state["error"] = f"{type(e).__name__}: {e}"
        raise ExtensionUnavailable(_state["error"]) from e
    _state["info"], _state["error"] = info, None
    return info


@functools.lru_cache(maxsize=None)
def gemm_op():
    """``torch.ops.dsv4lab_cublas.gemm_bf16_bf16_fp32`` (builds the extension on first use); no Python checks."""
    build()
    return getattr(getattr(torch.ops, LIBRARY), OP_NAME)


def router_gemm_cublas(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``cublasGemmEx`` bf16 x bf16 -> fp32 [M, N] (x [M, K], weight [N, K]); builds the extension on first use."""
    check_bf16_gemm_inputs(x, weight, require_cuda=True)
    return gemm_op()(x, weight)

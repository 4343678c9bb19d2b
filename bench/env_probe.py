"""Print what the GPU host offers dsv4lab: versions, build tools, importable backends. Run first on a new host."""
import importlib
import shutil
import subprocess
import sys

import torch

print("python", sys.version.split()[0])
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available() and torch.cuda.get_device_name())
if torch.cuda.is_available():
    print("capability", torch.cuda.get_device_capability(), "mem GiB", round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1))
for tool in ("nvcc", "ninja", "g++", "nvidia-smi", "compute-sanitizer"):
    print(f"which {tool}:", shutil.which(tool))
for mod in ("triton", "ninja", "tilelang", "deep_gemm", "tile_kernels", "pandas", "plotly", "safetensors", "tqdm", "numpy"):
    try:
        m = importlib.import_module(mod)
        print(f"import {mod}: ok", getattr(m, "__version__", ""))
    except Exception as e:
        print(f"import {mod}: FAILED {type(e).__name__}: {str(e)[:200]}")
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,memory.total", "--format=csv"], capture_output=True, text=True).stdout)
if shutil.which("nvcc"):
    print(subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.splitlines()[-1])

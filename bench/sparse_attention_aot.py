"""Static sm_90a facts of the sparse-attention launch configs, without a GPU (Triton AOT build + ptxas -v).

    python bench/sparse_attention_aot.py            # one line per CONFIGS entry (prefill/decode kernel, d = 512)

Per config: shared memory per program, registers per thread and spill bytes (ptxas), whether both dots are wgmma,
and how many K-row gathers the pipeliner issues before its loop (the prefetch depth: 1 = the gather of chunk i+1 is
waited for at the top of iteration i+1 with nothing else in flight). Integer arguments that the JIT specializes as
divisible by 16 on the H100 (pointers, strides, n_heads, n_cand) get the same hint here; without it the K gather is
not made asynchronous at all, which is not what runs on the GPU.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SIGNATURE = {"q_ptr": "*bf16", "kv_ptr": "*bf16", "idx_ptr": "*i32", "sink_ptr": "*fp32", "o_ptr": "*bf16",
             "part_acc_ptr": "*fp32", "part_ml_ptr": "*fp32", "n_heads": "i32", "n_head_blocks": "i32",
             "n_rows": "i32", "n_cand": "i32", "split_len": "i32", "n_splits": "i32", "stride_qt": "i32",
             "stride_qh": "i32", "stride_kv": "i32", "stride_it": "i32", "stride_ot": "i32", "stride_oh": "i32",
             "scale_log2e": "fp32"}
DIVISIBLE = [n for n in SIGNATURE if n.endswith("_ptr")] + ["n_heads", "n_cand", "stride_qt", "stride_qh",
                                                           "stride_kv", "stride_it", "stride_ot", "stride_oh"]


def build(cfg: dict, *, split: bool = False, trim: bool = True, head_dim: int = 512) -> dict:
    """Compile ``_sparse_attn_kernel`` for sm_90a with ``cfg`` and return its static facts."""
    import triton
    from triton.backends.compiler import GPUTarget

    from dsv4lab.kernels.triton import sparse_attention as SA

    fn = SA._sparse_attn_kernel
    consts = {"HEAD_DIM": head_dim, "BLOCK_H": cfg["block_h"], "BLOCK_N": cfg["block_n"], "SPLIT": split,
              "TRIM": trim, "DOT_FP32": False, "CONST_SPLIT_LEN": 0, "TRIM_BLOCK": 256}
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in DIVISIBLE}
    src = triton.compiler.ASTSource(fn=fn, signature={**SIGNATURE, **{c: "constexpr" for c in consts}},
                                    constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    ptx, ttgir = k.asm["ptx"], k.asm["ttgir"]
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.ptx").write_text(ptx)
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(Path(tmp) / "k.ptx"), "-o", os.devnull],
                             capture_output=True, text=True)
    regs = re.search(r"Used (\d+) registers", res.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", res.stderr)
    first_dot = ttgir.find("warp_group_dot" if "warp_group_dot" in ttgir else "tt.dot")
    loop_at = ttgir.rfind("scf.for", 0, first_dot)              # the main loop (the trim scan comes before it)
    k_gather = re.compile(r"async_copy_global_to_local[^\n]*x\d+xbf16")     # the 2-D K-row gathers
    return {"shared_bytes": k.metadata.shared, "registers": int(regs.group(1)) if regs else None,
            "spill_bytes": int(spill.group(1)) + int(spill.group(2)) if spill else None,
            "wgmma": "wgmma.mma_async" in ptx,
            "k_prefetch_depth": len(k_gather.findall(ttgir, ttgir.rfind("scf.for", 0, loop_at) + 1, loop_at))}


def main() -> int:
    from dsv4lab.kernels.triton.sparse_attention import CONFIGS, DEFAULTS

    print(f"defaults: {DEFAULTS}")
    for name, cfg in CONFIGS.items():
        for split in (False, True):
            try:
                f = build(cfg, split=split)
                print(f"{name:14s} split={split!s:5s} smem {f['shared_bytes'] / 1024:6.1f} KiB  regs {f['registers']}"
                      f"  spill {f['spill_bytes']} B  wgmma {f['wgmma']}  K prefetch depth {f['k_prefetch_depth']}",
                      flush=True)
            except Exception as e:  # a config that does not build is a fact too
                print(f"{name:14s} split={split!s:5s} FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

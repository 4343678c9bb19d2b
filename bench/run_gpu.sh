#!/usr/bin/env bash
# One GPU session: unpack the .gpu bundle (and test wheels in .whl if carried), then run the named bench
# scripts, each under its own time limit, writing <out>/<experiment>.jsonl and one combined log.
# Before the device call, here: (git rev-parse --short HEAD; ...) > .commit and carry .commit with .gpu (see README)
# Usage on the GPU host:  bash bench/run_gpu.sh "$OUT" peaks pr41300_router_gemm:150 "name:limit:--script args" ...
#                         (or "tests:<pytest args>", or "torchrun:<nproc>:<name>:<limit>:<script args>")
set -u
out=${1:?out dir}; shift
tmp=$(python3 -c 'import tempfile;print(tempfile.gettempdir())')
python3 -c "import tarfile; tarfile.open('.gpu/site-cp312.tar.xz').extractall('$tmp', filter='tar')" || exit 1
export PYTHONPATH=$tmp/site:$PWD PYTHONUNBUFFERED=1
# the copy of the tree on the GPU host has no .git: the commit travels in .commit (git rev-parse here, carried)
[ -f .commit ] && export DSV4LAB_COMMIT=$(cat .commit)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/whl .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/whl
fi
log=$out/log.txt
# JIT caches (DeepGEMM, TileLang, Triton) travel between device calls as .gpucache/caches.tar.xz (ignored, carried):
# a fresh machine then skips minutes of compilation. SAVE_CACHES=1 packs them into $out/caches.tar.xz at the end.
export DG_JIT_CACHE_DIR=${DG_JIT_CACHE_DIR:-$PWD/build/deep_gemm_jit} TILELANG_CACHE_DIR=${TILELANG_CACHE_DIR:-$PWD/build/tilelang_cache}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/build/triton_cache}
[ -f .gpucache/caches.tar.xz ] && tar -xJf .gpucache/caches.tar.xz && echo "caches restored: $(du -sh build | cut -f1)" | tee -a "$log"
for job in "$@"; do
  start=$(date +%s)
  if [[ $job == torchrun:* ]]; then
    # "torchrun:<nproc>:<name>:<limit>:<script args>" -- multi-GPU scripts; NVLink multicast stays off everywhere
    IFS=: read -r _ nproc name lim extra <<< "$job"; lim=${lim:-240}
    echo "=== torchrun x$nproc $name (limit ${lim}s) $extra" | tee -a "$log"
    # shellcheck disable=SC2086
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
      timeout "$lim" python3 -m torch.distributed.run --standalone --nproc-per-node "$nproc" "bench/$name.py" \
      --out "$out" $extra 2>&1 | tail -120 | tee -a "$log"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
  elif [[ $job == tests:* ]]; then
    echo "=== pytest ${job#tests:}" | tee -a "$log"
    timeout 200 python3 -m pytest -q -p no:cacheprovider ${job#tests:} 2>&1 | tail -40 | tee -a "$log"
  else
    IFS=: read -r name lim extra <<< "$job"; lim=${lim:-240}
    echo "=== $name (limit ${lim}s) $extra" | tee -a "$log"
    # shellcheck disable=SC2086  # extra holds the script's own arguments
    timeout "$lim" python3 "bench/$name.py" --out "$out" $extra 2>&1 | tail -80 | tee -a "$log"
    echo "exit ${PIPESTATUS[0]}" | tee -a "$log"
    # later scripts read measured peaks through roofline.load_peaks() instead of measuring again
    if [[ $name == peaks && -f $out/peaks.jsonl ]]; then
      slug=$(python3 -c 'from dsv4lab.lab.results import gpu_slug; print(gpu_slug())')
      mkdir -p "data/results/$slug" && cp "$out/peaks.jsonl" "data/results/$slug/peaks.jsonl"
    fi
  fi
  echo "--- $job took $(( $(date +%s) - start )) s" | tee -a "$log"
done
if [ "${SAVE_CACHES:-0}" = 1 ] && [ -d build ]; then
  XZ_OPT=-6 tar -cJf "$out/caches.tar.xz" build/deep_gemm_jit build/tilelang_cache build/triton_cache 2>/dev/null
  echo "caches saved: $(du -h "$out/caches.tar.xz" | cut -f1)" | tee -a "$log"
fi

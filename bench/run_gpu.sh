#!/usr/bin/env bash
# One GPU session: unpack the .gpu bundle (and test wheels in .whl if carried), then run the named bench
# scripts, each under its own time limit, writing <out>/<experiment>.jsonl and one combined log.
# Before the device call, here: (git rev-parse --short HEAD; ...) > .commit and carry .commit with .gpu (see README)
# Usage on the GPU host:  bash bench/run_gpu.sh "$OUT" peaks pr41300_router_gemm:150 "name:limit:--script args" ...
#                         (or "tests:<pytest args>")
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
for job in "$@"; do
  start=$(date +%s)
  if [[ $job == tests:* ]]; then
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

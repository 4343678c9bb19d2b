#!/usr/bin/env bash
# Write the commit the GPU run measures to .commit (ignored, carried with .gpu): the device gets a copy of the
# working tree without .git, and bench/run_gpu.sh exports it as DSV4LAB_COMMIT for the records' provenance.
set -eu
cd "$(git rev-parse --show-toplevel)"
sha=$(git rev-parse --short HEAD)
[ -n "$(git status --porcelain)" ] && sha="$sha+dirty"
echo "$sha" > .commit
echo "$sha"

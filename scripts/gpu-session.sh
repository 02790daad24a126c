#!/usr/bin/env bash
# One GPU-machine call: the GPU tests, then the benchmarks that this session's changes must be re-timed
# with, each under its own time limit, logs under $OUT. Carry .wheelhouse and .relion.
# Usage on the device:  COMMIT=<hash> bash scripts/gpu-session.sh [test-seconds]
set -uo pipefail
OUT=${OUT:-$(pwd)/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if [ -d .relion/bin ]; then export PATH=$PWD/.relion/bin:$PATH LD_LIBRARY_PATH=$PWD/.relion/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi
timeout "${1:-330}" bash scripts/gpu-check.sh > "$OUT/check.log" 2>&1
echo "gpu-check exit $?" >> "$OUT/summary.txt"
bench() {  # name seconds command...
  local name=$1 secs=$2; shift 2
  echo "== $name: $*" >> "$OUT/bench.log"
  ( cd benchmarks && timeout "$secs" "$@" ) >> "$OUT/bench.log" 2>&1
  echo "== $name exit $?" >> "$OUT/bench.log"
}
bench reconstruct 90 python3 reconstruct.py --configs 256 --syms c1,i --expand "" --blob-variants "" --no-numpy
bench local_resolution 90 python3 local_resolution.py --box 96 --gpu-box 256
bench align_movies 200 python3 align_movies.py --sizes falcon --movies 6 --distinct 3 --workdir /tmp/movie_bench
cat "$OUT/summary.txt"; tail -40 "$OUT/bench.log"

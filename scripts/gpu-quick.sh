#!/usr/bin/env bash
# A short GPU-machine call: every GPU test, then the 256² reconstruction timing (C1 and I).
# Usage on the device (carry .wheelhouse):  COMMIT=<hash> [TESTS="test files"] bash scripts/gpu-quick.sh
set -uo pipefail
OUT=${OUT:-$(pwd)/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
python3 -m pip install --no-index --no-deps -q .wheelhouse/*.whl 2>/dev/null
python3 -m pip install --no-deps --no-build-isolation -q -e . || exit 1
{ echo "commit: ${COMMIT:-unknown}"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; } > "$OUT/summary.txt"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider ${TESTS:-xmipp_accel/tests} > "$OUT/gpu-tests.log" 2>&1
tail -1 "$OUT/gpu-tests.log" | sed 's/^/gpu tests: /' >> "$OUT/summary.txt"
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" >> "$OUT/summary.txt"
(cd benchmarks && timeout 90 python3 reconstruct.py --configs 256 --syms c1,i --expand "" --blob-variants "" \
   --no-numpy) > "$OUT/bench.log" 2>&1
cat "$OUT/summary.txt"; grep "^|\|^#" "$OUT/bench.log" | tail -6

#!/usr/bin/env bash
# Run the GPU tests (and optionally the benchmarks) on a GPU machine from a checkout.
# Usage on the lent device (carry .wheelhouse):  COMMIT=<hash> bash scripts/gpu-check.sh [--bench NAME ...]
# (COMMIT: the checkout's commit, as the device copy's .git may be older than its files)
# Writes $OUT/gpu-tests.log, $OUT/junit.xml and $OUT/summary.txt (device, commit, tests passed).
set -uo pipefail
OUT=${OUT:-$(pwd)/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
if ls .wheelhouse/*.whl >/dev/null 2>&1; then
  python3 -m pip install --no-index --no-deps -q .wheelhouse/*.whl 2>/dev/null
fi
python3 -m pip install --no-deps --no-build-isolation -q -e . || exit 1
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "commit: ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo '+dirty')}"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/device: /'
  python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
} > "$OUT/summary.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/junit.xml" xmipp_accel/tests \
  2>&1 | tee "$OUT/gpu-tests.log"
rc=${PIPESTATUS[0]}
tail -1 "$OUT/gpu-tests.log" | sed 's/^/gpu tests: /' >> "$OUT/summary.txt"
if ! python3 -c "import tkinter" 2>/dev/null; then   # no Tk here: the Scipion modules with the stand-in
  PYTHONPATH=$PWD/scripts/headless_tk${PYTHONPATH:+:$PYTHONPATH} python3 -m pytest -q -p no:cacheprovider \
    xmipp_accel/tests/test_plugin.py xmipp_accel/tests/test_convert.py xmipp_accel/tests/test_protocols_*.py \
    xmipp_accel/tests/test_viewers_scipion.py 2>&1 | tee "$OUT/scipion-tests.log" | tail -3
  [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
  tail -1 "$OUT/scipion-tests.log" | sed 's/^/scipion tests (headless_tk): /' >> "$OUT/summary.txt"
fi
if [ "${1:-}" = "--bench" ]; then
  shift
  for b in "$@"; do
    echo "== benchmark $b" | tee -a "$OUT/bench.log"
    timeout 300 python3 "benchmarks/$b.py" 2>&1 | tee -a "$OUT/bench.log"
  done
fi
cat "$OUT/summary.txt"
exit $rc

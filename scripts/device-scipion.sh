#!/usr/bin/env bash
# Scipion on a GPU node without Tk (the lent H100): install what pwem imports and the node lacks (wheels in
# .wheelhouse/extra, each only when its module is missing), report why a plugin would not register, then run
# the scripted Scipion demo with the tkinter stand-in (scripts/headless_tk).
# Usage: bash scripts/device-scipion.sh [demo args...]   (logs in $OUT)
set -uo pipefail
OUT=${OUT:-$(pwd)/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
for pair in psutil:psutil requests:requests charset_normalizer:charset_normalizer idna:idna urllib3:urllib3 \
            certifi:certifi skimage:scikit_image lazy_loader:lazy_loader imageio:imageio networkx:networkx \
            tifffile:tifffile; do
  mod=${pair%%:*}; whl=${pair##*:}
  if ! python3 -c "import $mod" 2>/dev/null; then
    echo "installing $whl (no $mod here)"
    python3 -m pip install --no-index --no-deps -q .wheelhouse/extra/${whl}-*.whl
  fi
done
export PYTHONPATH=$PWD/scripts/headless_tk${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY' 2>&1 | tee "$OUT/scipion-diagnose.log"
import importlib, logging, sys, traceback
logging.basicConfig(level=logging.INFO, stream=sys.stdout)
for name in ("tkinter", "pyworkflow", "pwem", "pwem.protocols", "xmipp_accel.protocols", "xmipp_accel.viewers"):
    try:
        importlib.import_module(name)
        print("import ok:", name)
    except Exception:
        print("import FAILED:", name)
        traceback.print_exc()
from pyworkflow.plugin import Domain
print("plugins:", sorted(Domain.getPlugins()))
PY
timeout 400 xmipp-accel demo --scipion "$@" 2>&1 | tee "$OUT/scipion-demo.log" | tail -40

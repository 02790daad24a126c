#!/bin/bash
# Run F (planned for the next session with device time): what run E left.
#   bash benchmarks/device/run_f.sh tests COMMIT    # whole GPU suite (~3 min)
#   bash benchmarks/device/run_f.sh soak COMMIT     # 200 movies 4096²x40 int8 through --watch (fixed no-signal file)
#   bash benchmarks/device/run_f.sh movies COMMIT   # ours + MotionCor3 (carry .mc3), warm-up then cold and warm passes
#   bash benchmarks/device/run_f.sh refcpu COMMIT   # our CPU refine with all 16 cores (threaded since 988a9e2)
# Carry .wheelhouse (and .mc3 for movies). Logs and JSON under $OUT.
set -u
STAGE=$1; COMMIT=$2; T0=$(date +%s)
python3 -m pip install --no-index --no-deps -q .wheelhouse/*.whl 2>/dev/null
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1
{ echo "stage $STAGE commit $COMMIT $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"; nproc; } > $OUT/device_$STAGE.txt
case $STAGE in
  tests)  timeout 500 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 xmipp_accel/tests > $OUT/gpu_tests.log 2>&1 ;;
  soak)   timeout 560 python3 benchmarks/watch_soak.py --movies 200 --corrupt 5 --size 4096 --frames 40 --gpus 0 \
              --json $OUT/soak.json > $OUT/soak.log 2>&1 ;;
  movies) timeout 560 python3 benchmarks/movies_side_by_side.py --motioncor3 .mc3/bin/MotionCor3 --skip relion \
              --json $OUT/movies.json > $OUT/movies.log 2>&1 ;;
  refcpu) timeout 560 python3 benchmarks/refine_relion.py --no-relion --ours cpu --box 64 --particles 4000 --snr 0.05 \
              --threads 16 --workdir /tmp/rrf --json $OUT/refine_cpu16.json > $OUT/refine_cpu16.log 2>&1 ;;
esac
echo "$STAGE rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt

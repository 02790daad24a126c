#!/bin/bash
# Run F: what run E left (issues 15 and 16).
#   bash benchmarks/device/run_f.sh tests,soak COMMIT   # whole GPU suite (~3 min), then 200 movies 2048²x40 int8
#                                                       # through --watch (no-signal file in the movies' dtype)
#   bash benchmarks/device/run_f.sh movies COMMIT       # ours (1 and 2 workers/GPU) + MotionCor3 (carry .mc3):
#                                                       # warm-up, then cold and warm passes, 20 distinct 4096²x40
#   bash benchmarks/device/run_f.sh refcpu COMMIT       # our CPU refine on the 16 cores, then RELION (3 ranks x 8
#                                                       # threads) in what is left of 540 s, same STAR and model
# Stages run in the order given (comma-separated). Carry .wheelhouse (.mc3 for movies, .relion for refcpu).
# Logs and JSON under $OUT.
set -u
STAGES=$1; COMMIT=$2; T0=$(date +%s)
python3 -m pip install --no-index --no-deps -q .wheelhouse/*.whl 2>/dev/null
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1
export PATH=$PWD/.relion/bin:$PATH LD_LIBRARY_PATH=$PWD/.relion/lib
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
for STAGE in ${STAGES//,/ }; do
{ echo "stage $STAGE commit $COMMIT $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"; nproc; } > $OUT/device_$STAGE.txt
case $STAGE in
  tests)  timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=15 xmipp_accel/tests > $OUT/gpu_tests.log 2>&1 ;;
  soak)   timeout 240 python3 benchmarks/watch_soak.py --movies 200 --corrupt 5 --size 2048 --frames 40 --gpus 0 \
              --json $OUT/soak.json > $OUT/soak.log 2>&1 ;;
  movies) timeout 560 python3 benchmarks/movies_side_by_side.py --motioncor3 .mc3/bin/MotionCor3 --skip relion \
              --ours-workers-per-gpu 1,2 --json $OUT/movies.json > $OUT/movies.log 2>&1 ;;
  refcpu) timeout 570 python3 benchmarks/refine_relion.py --ours cpu --order ours-first --total-budget 540 \
              --timeout 420 --box 64 --particles 4000 --snr 0.05 --threads 16 --relion-threads 8 --mpi 3 \
              --workdir /tmp/rrf --json $OUT/refine_cpu16.json > $OUT/refine_cpu16.log 2>&1 ;;
esac
echo "$STAGE rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt
done
cp /tmp/rrf/ours_cpu/iterations.jsonl $OUT/ours_cpu_iterations.jsonl 2>/dev/null
cp /tmp/rrf/ours_cpu.log $OUT/ 2>/dev/null

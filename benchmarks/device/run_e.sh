#!/bin/bash
# Run E on the GPU machine (2026-12-07): the issue-15 refine side by side with RELION across chained calls.
#   bash benchmarks/device/run_e.sh start COMMIT   # GPU tests, disk read floor, ours on the GPU, RELION detached
#   bash benchmarks/device/run_e.sh attach COMMIT  # wait on / continue RELION, score it (next call, machine warm)
# Carry .wheelhouse and .relion. Logs and JSON under $OUT. Work folder .rr/e (git-ignored, kept while warm).
set -u
STAGE=$1; COMMIT=$2; T0=$(date +%s)
python3 -m pip install --no-index --no-deps -q .wheelhouse/*.whl 2>/dev/null
python3 -m pip install --no-deps --no-build-isolation -q -e . >/dev/null 2>&1
export PATH=$PWD/.relion/bin:$PATH LD_LIBRARY_PATH=$PWD/.relion/lib
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
{ echo "stage $STAGE commit $COMMIT $(date -u +%FT%TZ)"; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
  python3 -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"; nproc; } > $OUT/device_$STAGE.txt
W=$PWD/.rr/e
SIZE="--box 64 --particles 4000 --snr 0.05"
RELION="--threads 16 --relion-threads 8 --mpi 3"
if [ "$STAGE" = start ]; then
  timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=12 xmipp_accel/tests/test_movie_apply.py xmipp_accel/tests/test_machinery_integration.py xmipp_accel/tests/test_tuning_autotune.py xmipp_accel/tests/test_refine_accuracy.py xmipp_accel/tests/test_fsc.py xmipp_accel/tests/test_movie_global.py xmipp_accel/tests/test_movie_local.py xmipp_accel/tests/test_projmatch.py xmipp_accel/tests/test_local_resolution.py xmipp_accel/tests/test_jobs_watch.py xmipp_accel/tests/test_deepalign.py > $OUT/gpu_tests.log 2>&1
  echo "gpu tests rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt
  timeout 60 python3 benchmarks/disk_read.py --files 4 --readers 1,4 --json $OUT/disk.json > $OUT/disk.log 2>&1
  echo "disk rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt
  rm -rf $W; mkdir -p $W
  LEFT=$(( 578 - ($(date +%s) - T0) ))
  python3 benchmarks/refine_relion.py $SIZE $RELION --ours gpu --order ours-first --relion-detach \
      --total-budget $LEFT --workdir $W --json $OUT/refine_start.json > $OUT/refine_start.log 2>&1
  echo "refine rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt
  cp $OUT/refine_start.json $W/ 2>/dev/null
  cp $W/ours_gpu.log $OUT/ 2>/dev/null; cp $W/ours_gpu/iterations.jsonl $OUT/ours_gpu_iterations.jsonl 2>/dev/null
else
  python3 benchmarks/refine_relion.py --attach --workdir $W --relion-timeout $(( 570 - ($(date +%s) - T0) )) \
      --merge-json $W/refine_start.json --json $OUT/refine_attach.json > $OUT/refine_attach.log 2>&1
  echo "attach rc $? at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt
fi
cp $W/relion/launch.json $OUT/launch_$STAGE.json 2>/dev/null
tail -c 20000 $W/relion/relion.log > $OUT/relion_$STAGE.log 2>/dev/null
ps -eo pid,sid,etimes,pcpu,args | grep -E "relion_refine|mpirun" | grep -v grep > $OUT/ps_$STAGE.txt
echo "end at $(( $(date +%s) - T0 )) s" >> $OUT/device_$STAGE.txt

#!/usr/bin/env bash
# The QM9 medium preset (issue 17 item 4): EW, DB-MTL, MGDA, PCGrad, Nash-MTL, FAMO, UPGrad and the 11 STL
# baselines, one process per (method, seed), at most JOBS at once (default 2, one per core, each single-threaded).
#
#   bash benchmarks/qm9_medium.sh OUT_DIR CACHE_DIR [extra applications.qm9 arguments...]
#   env: METHODS (default "ew dbmtl stl famo pcgrad upgrad mgda nash_mtl"), SEEDS (default "0 1 2"),
#        JOBS (default 2), PYTHON (default python3), BASELINES (STL baselines for epoch selection while the
#        medium ones train; default applications/qm9/stl_baselines_quick.json)
#
# Each run writes OUT_DIR/<method>_seed<s>/ (run JSON, curve file; its log beside the folder) as soon as it
# finishes. Then merge and rebase on the medium STL baselines (the report checks that every run keeps the epoch
# it chose against the provisional ones):
#   python -m applications.qm9.report applications/qm9/stl_baselines_medium.json \
#     --merge-stl OUT_DIR/stl_seed*/stl_baselines_medium.json
#   python -m applications.qm9.report OUT_DIR --baselines applications/qm9/stl_baselines_medium.json
set -u
out=$1 cache=$2
shift 2
py=${PYTHON:-python3}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
export XLA_FLAGS=${XLA_FLAGS:---xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1}
baselines=${BASELINES:-applications/qm9/stl_baselines_quick.json}
for m in ${METHODS:-ew dbmtl stl famo pcgrad upgrad mgda nash_mtl}; do
  for s in ${SEEDS:-0 1 2}; do
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-2}" ]; do wait -n; done
    if [ "$m" = stl ]; then what=(--stl); else what=(--balancer "$m" --baselines "$baselines"); fi
    echo "$(date -u +%H:%M:%S) start ${m}_seed$s"
    "$py" -m applications.qm9 --preset medium --backend jax "${what[@]}" --seeds "$s" --cache-dir "$cache" \
      --out "$out/${m}_seed$s" "$@" > "$out/${m}_seed$s.log" 2>&1 &
  done
done
wait
echo "$(date -u +%H:%M:%S) all done"

#!/usr/bin/env bash
# Quality of amortised DB-MTL (compile(task_gradients_every=k)) on the QM9 quick preset: k in KS, seeds in SEEDS,
# at most JOBS processes at once (default 3).
#
#   bash benchmarks/qm9_amortised.sh OUT_DIR CACHE_DIR [extra applications.qm9 arguments...]
#   env: KS (default "2 5 10 20"), SEEDS (default "0 1 2"), JOBS (default 3), PYTHON (default python3)
#
# Each run writes OUT_DIR/every<k>_seed<s>/run_dbmtl-every<k>_seed<s>.json (and its curve file; its log beside the
# folder). Merge with the exact runs of the main job: `python -m applications.qm9.report FOLDER` over a folder
# holding both.
set -u
out=$1 cache=$2
shift 2
py=${PYTHON:-python3}
mkdir -p "$out"
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1
for k in ${KS:-2 5 10 20}; do
  for s in ${SEEDS:-0 1 2}; do
    while [ "$(jobs -rp | wc -l)" -ge "${JOBS:-3}" ]; do wait -n; done
    "$py" -m applications.qm9 --preset quick --backend jax --balancer dbmtl --task-gradients-every "$k" \
      --seeds "$s" --cache-dir "$cache" --out "$out/every${k}_seed$s" "$@" > "$out/every${k}_seed$s.log" 2>&1 &
  done
done
wait

#!/usr/bin/env bash
# Learning curves of QM9 (quick model, JAX): one process per balancer and seed, all in parallel (one GPU, or CPU).
#
#   bash benchmarks/qm9_curves.sh OUT_DIR CACHE_DIR [EPOCHS] [extra applications.qm9 arguments...]
#   env: BALANCERS (default "ew dbmtl"), SEEDS (default "0 1 2"), PYTHON (default python3)
#
# Each run writes OUT_DIR/<balancer>_seed<seed>/curve_<balancer>_seed<seed>.json after every epoch (validation
# Δp per epoch, epoch and training times), run_<balancer>_seed<seed>.json when it ends (test MAE and Δp at the
# epoch chosen on validation Δp) and its log in OUT_DIR/<balancer>_seed<seed>.log. CACHE_DIR holds the .npz
# made by `python -m applications.qm9 --preset quick --prepare-data --cache-dir CACHE_DIR` (no RDKit,
# TensorFlow or spektral needed here).
set -u
out=$1 cache=$2 epochs=${3:-100}
shift $(( $# < 3 ? $# : 3 ))
py=${PYTHON:-python3}
mkdir -p "$out"
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for b in ${BALANCERS:-ew dbmtl}; do
  for s in ${SEEDS:-0 1 2}; do
    "$py" -m applications.qm9 --preset quick --backend jax --balancer "$b" --seeds "$s" --epochs "$epochs" \
      --lr-patience 5 --cache-dir "$cache" --out "$out/${b}_seed$s" "$@" > "$out/${b}_seed$s.log" 2>&1 &
  done
done
wait

"""Command line: ``python -m applications.qm9 --preset quick|paper ...`` (see ``--help``).

``--backend`` is applied to ``KERAS_BACKEND`` before Keras is imported.
"""

import argparse
import os
import shlex
import sys

from applications import experiment


def parser():
    p = argparse.ArgumentParser(
        prog="python -m applications.qm9",
        description="QM9 (11 targets) with keras-dbmtl: MTL balancers vs single-task (STL) baselines.",
        epilog="Data: the 130,831 molecules of QM9 as shipped by the PyPI package qm9pack==1.0.3 (its CSV "
               "files; read without importing it). The first run perceives bonds with RDKit and caches the "
               "graphs as one .npz in --cache-dir; later runs need only that file (no RDKit, qm9pack, "
               "spektral or TensorFlow: build it once with --prepare-data, then copy the folder).")
    p.add_argument("--preset", choices=("quick", "medium", "paper"), default="quick",
                   help="quick (default): EW and DB-MTL, 3 seeds, ~8.5 min on 2 CPU cores (smaller model, bonded "
                        "edges, 4,000 molecules, 12 epochs, cosine schedule); medium: 8,000 molecules, 20 epochs, "
                        "~40 min per seed on 2 CPU cores for 7 balancers and the STL baselines "
                        "(benchmarks/qm9_medium.sh runs 3 seeds in 2 h); paper: the paper's "
                        "model and recipe, all molecules, 300 epochs (a GPU job)")
    experiment.add_arguments(p, balancers=("ew", "dbmtl"), seeds=(0, 1, 2), out=None, backend="jax")
    p.add_argument("--stl", action="store_true",
                   help="train the 11 single-task baselines (writes <out>/stl_baselines_<preset>.json); "
                        "with --balancer too, Δp uses these fresh baselines")
    p.add_argument("--epochs", type=int, default=None, help="override the preset's epochs")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=None)
    p.add_argument("--dim", type=int, default=None, help="override the node state width")
    p.add_argument("--edges", choices=("complete", "bonds"), default=None,
                   help="graph edges: complete graph (paper) or bonded pairs only (quick)")
    p.add_argument("--subset", nargs="+", type=int, default=None, metavar="N",
                   help="N_TRAIN N_VAL N_TEST taken from the full seeded split, or 0 for all molecules")
    p.add_argument("--features", choices=("rdkit", "reference"), default="rdkit",
                   help="rdkit: sanitised aromatic/hybridisation features; reference: zeros as in the "
                        "reference's unsanitised molecules")
    p.add_argument("--split-seed", dest="split_seed", type=int, default=0)
    p.add_argument("--baselines", default=None,
                   help="STL baselines json (default applications/qm9/stl_baselines_<preset>.json)")
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="preprocessed-data cache (default $KERAS_DBMTL_CACHE/qm9 or ~/.cache/keras_dbmtl/qm9)")
    p.add_argument("--rebuild-cache", dest="rebuild_cache", action="store_true")
    p.add_argument("--prepare-data", dest="prepare_data", action="store_true",
                   help="only build the preprocessed .npz cache of the chosen preset/--subset in --cache-dir "
                        "(needs RDKit and qm9pack) and exit; a later run with the same --cache-dir needs "
                        "neither, nor TensorFlow or spektral")
    p.add_argument("--lr", type=float, default=None, help="override the preset's (initial) learning rate")
    p.add_argument("--schedule", choices=("plateau", "cosine"), default=None,
                   help="learning-rate schedule: plateau (ReduceLROnPlateau on validation Δp, the paper's) or "
                        "cosine (decay to the preset's min_lr over all epochs)")
    p.add_argument("--task-gradients-every", dest="task_gradients_every", type=int, default=1, metavar="K",
                   help="compile(task_gradients_every=K): per-task gradients every K steps, the last balancing "
                        "weights in between (one backward pass); runs are labelled <balancer>-everyK")
    p.add_argument("--task-gradients", dest="task_gradients", choices=("parameters", "representation"),
                   default="parameters", help="compile(task_gradients=...): representation-level gradients for "
                                               "the Gramian-only balancers; runs are labelled <balancer>-rep")
    p.add_argument("--lr-patience", dest="lr_patience", type=int, default=None,
                   help="override the preset's ReduceLROnPlateau patience (epochs; the paper: 5)")
    p.add_argument("--verbose", type=int, default=0,
                   help="Keras fit verbosity (0: one short line per epoch; 1: a progress bar with the loss, "
                        "Δp and a summary of the per-task keys, which stay in History; 2: Keras' epoch lines)")
    return p


def check_args(p, args):
    """Errors for arguments that need no Keras (before the backend is chosen or any data is read)."""
    if args.subset is not None and args.subset != [0] and (len(args.subset) != 3 or min(args.subset) < 1):
        p.error("--subset takes N_TRAIN N_VAL N_TEST (positive), or 0 for all molecules")
    for key in ("epochs", "batch_size", "dim"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be a positive integer, got {value}")
    if args.task_gradients_every < 1:
        p.error(f"--task-gradients-every must be a positive integer, got {args.task_gradients_every}")
    if args.lr is not None and not args.lr > 0:
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.lr_patience is not None and args.lr_patience < 0:
        p.error(f"--lr-patience must be >= 0, got {args.lr_patience}")
    if args.baselines is not None and not os.path.isfile(args.baselines):
        p.error(f"--baselines {args.baselines}: no such file")
    if args.seeds is not None:
        try:
            experiment.check_seeds(args.seeds)
        except experiment.ExperimentError as err:
            p.error(str(err))


def preset_balancer_args(args, preset):
    """The preset's balancer arguments (e.g. the quick preset's validated DB-MTL beta) for every balancer to be trained
    that the command line gives no arguments or grid of its own; the run's label shows them (``dbmtl[beta=0.1]``)."""
    balancers = args.balancer or args._experiment_defaults["balancers"]
    named = set()
    for text in list(args.balancer_args) + list(args.grid):
        name, _ = experiment.parse_named(text, "--balancer-args")
        named.add(name if name is not None else (balancers[0] if len(balancers) == 1 else None))
    extra = [f"{name}:" + ",".join(f"{k}={v}" for k, v in kwargs.items())
             for name, kwargs in preset.get("balancer_args", {}).items() if name in balancers and name not in named]
    return list(args.balancer_args) + extra


def check_task_gradient_mode(setting, args):
    """--task-gradients(-every) against each balancer, before any data or training (the QM9 model has one shared
    representation and no activity regularizer, so only the balancer can make the mode unavailable)."""
    from keras_dbmtl import task_gradients

    try:
        task_gradients.check(setting.make(), args.task_gradients, args.task_gradients_every)
    except ValueError as err:
        raise experiment.ExperimentError(f"balancer {setting.balancer}: {err}") from err


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = parser()
    args = p.parse_args(argv)
    check_args(p, args)
    args.balancer_given = args.balancer is not None or bool(args.grid) or bool(args.balancer_args)
    if args.out is None:
        args.out = os.path.join("results", f"qm9_{args.preset}")
    try:
        experiment.apply_backend(args.backend, default="jax")
    except experiment.ExperimentError as err:
        p.error(str(err))
    from applications.qm9 import train  # imports keras: after KERAS_BACKEND is set

    command = "python -m applications.qm9 " + " ".join(shlex.quote(a) for a in argv)
    try:
        if args.stl and not args.balancer_given:
            plan = experiment.make_plan([], seeds=args.seeds or train.PRESETS[args.preset]["seeds"],
                                        out=args.out)
        else:
            if args.seeds is None:
                args.seeds = list(train.PRESETS[args.preset]["seeds"])
            args.balancer_args = preset_balancer_args(args, train.PRESETS[args.preset])
            plan = experiment.plan_from_args(args)
            tag = "-".join(t for t in ((f"every{args.task_gradients_every}" if args.task_gradients_every > 1 else ""),
                                       ("rep" if args.task_gradients == "representation" else "")) if t)
            for setting in plan.settings:
                setting.tag = tag or None
                check_task_gradient_mode(setting, args)
    except experiment.ExperimentError as err:
        p.error(str(err))
    return train.main(args, command, plan)


if __name__ == "__main__":
    from applications.common import rerun_with_malloc_tunables

    rerun_with_malloc_tunables()  # no per-step mmap/munmap of XLA's temporaries (see applications.common)
    main()

"""Command line: ``python -m applications.qm9 --preset quick|paper ...`` (see ``--help``).

``--backend`` is applied to ``KERAS_BACKEND`` before Keras is imported.
"""

import argparse
import os
import shlex
import sys


def parser():
    p = argparse.ArgumentParser(
        prog="python -m applications.qm9",
        description="QM9 (11 targets) with keras-dbmtl: MTL balancers vs single-task (STL) baselines.",
        epilog="Data: the 130,831 molecules of QM9 as shipped by the PyPI package qm9pack==1.0.3 (its CSV "
               "files; read without importing it). The first run perceives bonds with RDKit and caches the "
               "graphs as one .npz in --cache-dir; later runs need only that file (no RDKit, qm9pack, "
               "spektral or TensorFlow: build it once with --prepare-data, then copy the folder).")
    p.add_argument("--preset", choices=("quick", "paper"), default="paper",
                   help="paper: the paper's model and recipe (a GPU job); quick: ~10 min on 2 CPU cores")
    p.add_argument("--balancer", nargs="+", default=None,
                   help="balancer name(s) (keras_dbmtl.balancers), default: ew dbmtl")
    p.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None,
                   help="Keras backend (sets KERAS_BACKEND; default: the environment's, else jax)")
    p.add_argument("--seeds", nargs="+", type=int, default=None,
                   help="training seeds (default: quick 0, paper 0 1 2)")
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
    p.add_argument("--out", default=None, help="output folder (default results/qm9_<preset>)")
    p.add_argument("--cache-dir", dest="cache_dir", default=None,
                   help="preprocessed-data cache (default $KERAS_DBMTL_CACHE/qm9 or ~/.cache/keras_dbmtl/qm9)")
    p.add_argument("--rebuild-cache", dest="rebuild_cache", action="store_true")
    p.add_argument("--prepare-data", dest="prepare_data", action="store_true",
                   help="only build the preprocessed .npz cache of the chosen preset/--subset in --cache-dir "
                        "(needs RDKit and qm9pack) and exit; a later run with the same --cache-dir needs "
                        "neither, nor TensorFlow or spektral")
    p.add_argument("--lr-patience", dest="lr_patience", type=int, default=None,
                   help="override the preset's ReduceLROnPlateau patience (epochs; the paper: 5)")
    p.add_argument("--verbose", type=int, default=0,
                   help="Keras fit verbosity (0: one short line per epoch, 1, 2: Keras' own)")
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.subset is not None and args.subset != [0] and len(args.subset) != 3:
        parser().error("--subset takes N_TRAIN N_VAL N_TEST (or 0)")
    args.balancer_given = args.balancer is not None
    if args.balancer is None:
        args.balancer = ["ew", "dbmtl"]
    if args.backend:
        if "keras" in sys.modules and os.environ.get("KERAS_BACKEND") != args.backend:
            raise RuntimeError("keras was imported before --backend could be applied")
        os.environ["KERAS_BACKEND"] = args.backend
    else:
        os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from applications.qm9 import train  # imports keras: after KERAS_BACKEND is set

    command = "python -m applications.qm9 " + " ".join(shlex.quote(a) for a in argv)
    return train.main(args, command)


if __name__ == "__main__":
    main()

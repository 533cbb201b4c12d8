"""The command line shared by `python -m applications.nyuv2` and `python -m applications.cityscapes`.

Nothing here imports Keras before `--backend` has set `KERAS_BACKEND`.
"""

import argparse
import os
import sys

from applications import experiment


def build_parser(preset):
    d = preset["defaults"]
    p = argparse.ArgumentParser(
        prog=f"python -m applications.{preset['name']}",
        description=f"{preset['title']} multi-task training with any keras_dbmtl balancer on any Keras backend. "
                    f"Data: {preset['download']}. Defaults are the paper's settings.")
    p.add_argument("--data-root", required=True, help="folder holding train/ and val/ (<i>.npy files)")
    p.add_argument("--write-samples", type=int, default=0, metavar="N",
                   help="first write N synthetic train and N//2 val samples into an empty --data-root "
                        "(at --image-size, default 32x32) for a smoke run")
    experiment.add_arguments(p, balancers=("dbmtl",), seeds=(0,), out=f"results/{preset['name']}")
    p.add_argument("--arch", default="hps", choices=["hps", "mtan", "cross_stitch", "segnet"])
    p.add_argument("--tasks", default=None, help=f"comma-separated subset of {','.join(preset['tasks'])}")
    p.add_argument("--stl", action="store_true", help="also train one single-task model per task (Δp baseline)")
    p.add_argument("--stl-results", default=None, help="json of an earlier --stl run to reuse as the baseline")
    p.add_argument("--epochs", type=int, default=d["epochs"])
    per_arch = [f"{arch}: {v['batch_size']}" for arch, v in preset["arch_defaults"].items() if "batch_size" in v]
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {d['batch_size']}" + (f" ({', '.join(per_arch)})" if per_arch else ""))
    p.add_argument("--eval-batch-size", type=int, default=None)
    p.add_argument("--lr", type=float, default=d["learning_rate"])
    p.add_argument("--weight-decay", type=float, default=d["weight_decay"])
    p.add_argument("--lr-decay-epoch", type=int, default=d["lr_decay_epoch"], help="halve the learning rate here")
    p.add_argument("--aug", default=None, action=argparse.BooleanOptionalAction,
                   help="random scale-crop and flip (default: off; on for --arch segnet, as Table 6)")
    p.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help=f"resize the samples (stored: {preset['image_size'][0]} {preset['image_size'][1]})")
    p.add_argument("--max-samples", type=int, default=None, help="use the first N samples of each split")
    p.add_argument("--backbone", default=d["backbone"],
                   choices=["resnet18", "resnet34", "resnet50", "resnet101", "tiny"],
                   help="ResNet of the hps/mtan/cross_stitch encoders ('tiny': 0.5 M parameters, for tests)")
    p.add_argument("--weights", default="auto",
                   help="keras-hub preset name or local preset folder ('auto': resnet_50_imagenet for resnet50, "
                        "none otherwise; 'none': random initialisation)")
    p.add_argument("--output-stride", type=int, default=8, choices=[8, 16])
    p.add_argument("--head-channels", type=int, default=256, help="ASPP head width (paper: 256)")
    p.add_argument("--segnet-width", type=int, default=64, help="SegNet first-stage width (paper: 64)")
    p.add_argument("--select", default="best", choices=["best", "last"],
                   help="report the epoch that improves most on the first (reference) or the last")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate the test split every N epochs")
    p.add_argument("--loader", default="pydataset", choices=["pydataset", "tf"],
                   help="keras.utils.PyDataset (any backend) or tf.data (needs TensorFlow)")
    p.add_argument("--workers", type=int, default=0, help="loader threads (PyDataset workers)")
    p.add_argument("--seed", type=int, default=None, help="one training seed (the same as --seeds SEED)")
    p.add_argument("--tag", default=None,
                   help="file name stem (default <dataset>_<arch>_<balancer>_<backend>; with several settings or "
                        "seeds, _<setting>_seed<seed> is appended)")
    p.add_argument("--verbose", type=int, default=2)
    return p


def select_backend(backend):
    try:
        experiment.apply_backend(backend)
    except experiment.ExperimentError as err:
        raise SystemExit(str(err)) from None


def main(preset, argv=None):
    """Checks every argument, then trains each balancer setting and seed (`applications.experiment`); STL models
    (`--stl`) are trained once, with the first run, and reused. NYUv2 and Cityscapes have no validation split:
    as in the reference, epochs (and so a `--grid`'s setting) are chosen on the test split. Returns the last
    run's summary with the runner's `experiment` (runs, grid winners, table) added."""
    prog = f"python -m applications.{preset['name']}"
    args = build_parser(preset).parse_args(argv)
    if args.seed is not None:
        if args.seeds is not None:
            raise SystemExit(f"{prog}: error: give --seed or --seeds, not both")
        args.seeds = [args.seed]
    select_backend(args.backend)
    unknown = [t for t in (args.tasks.split(",") if args.tasks else []) if t not in preset["tasks"]]
    if unknown:
        raise SystemExit(f"{prog}: error: --tasks: unknown {unknown}; {preset['title']} has "
                         f"{', '.join(preset['tasks'])}.")
    try:
        plan = experiment.plan_from_args(args)
    except experiment.ExperimentError as err:
        raise SystemExit(f"{prog}: error: {err}") from None
    from applications.scene import data, train

    defaults = dict(preset["defaults"], **preset["arch_defaults"].get(args.arch, {}))
    if args.write_samples:
        if os.path.isdir(os.path.join(args.data_root, "train")):
            raise SystemExit(f"--write-samples: {args.data_root}/train exists; give an empty --data-root.")
        data.write_samples(args.data_root, num_train=args.write_samples, num_val=max(args.write_samples // 2, 1),
                           image_size=tuple(args.image_size or (32, 32)),
                           num_classes=preset["tasks"]["segmentation"], normals="normal" in preset["tasks"],
                           seed=plan.seeds[0])
    weights = experiment.backbone_weights(args.weights, defaults["weights"] if args.backbone == "resnet50" else None)
    single = len(plan.settings) == 1 and len(plan.seeds) == 1
    stl_json = [args.stl_results]
    summaries = []

    def train_one(setting, seed):
        tag = experiment.run_tag(
            args.tag or f"{preset['name']}_{args.arch}_{setting.balancer}_{experiment.backend_name()}",
            setting, seed, single)
        summary = train.run(
            preset, args.data_root, balancer=setting.balancer, stl=args.stl and not stl_json[0],
            stl_results=stl_json[0], out_dir=plan.out, tag=tag, tasks=args.tasks.split(",") if args.tasks else None,
            arch=args.arch, balancer_args=setting.kwargs or None, epochs=args.epochs,
            batch_size=args.batch_size or defaults["batch_size"], eval_batch_size=args.eval_batch_size,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_decay_epoch=args.lr_decay_epoch,
            augment=defaults["augment"] if args.aug is None else args.aug,
            image_size=tuple(args.image_size) if args.image_size else None, max_samples=args.max_samples,
            backbone=args.backbone, weights=weights, head_channels=args.head_channels,
            segnet_width=args.segnet_width, output_stride=args.output_stride, select=args.select,
            eval_every=args.eval_every, seed=seed, loader=args.loader, workers=args.workers, verbose=args.verbose)
        if args.stl and not stl_json[0]:
            stl_json[0] = os.path.join(plan.out, f"{tag}.json")  # the first run's STL models serve every later one
        print(summary["markdown"])
        summaries.append(summary)
        result = {k: v for k, v in summary.items() if k != "model"}
        # no validation split: the selection score is the test Δp at the selected epoch (the reference's rule)
        result.update(val_delta_p=summary["delta_p"], selection_split="test")
        return result

    done = experiment.run_plan(plan, train_one, meta=dict(command=[prog] + list(argv or sys.argv[1:])))
    if not single:
        print(done["table"])
    summary = summaries[-1]
    summary["experiment"] = done
    return summary

"""Command line for Table 4: ``python -m applications.office --help``.

    KERAS_BACKEND=jax python -m applications.office --dataset office31 --data-root DATA \
        --balancer dbmtl --weights resnet_18_imagenet --stl
"""

import argparse
import sys

from applications import experiment


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m applications.office",
        description="Office-31 / Office-Home (the paper's Table 4): each domain is a task with its own "
                    "images, on a shared ResNet-18. The backend is KERAS_BACKEND or --backend.")
    p.add_argument("--dataset", default="office31", help="office31 | officehome (office-31/office-home too)")
    p.add_argument("--data-root", required=True, help="folder holding the domain folders (see data.py)")
    p.add_argument("--split-dir", default=None,
                   help="folder of <domain>_{train,val,test}.txt (default: DATA_ROOT, then DATA_ROOT/data_txt/<name>)")
    p.add_argument("--make-splits", action="store_true",
                   help="write a fresh seeded 60/20/20 split into --split-dir (or DATA_ROOT) first")
    experiment.add_arguments(p, balancers=("dbmtl",), seeds=(0,), out="results/office")
    p.add_argument("--domains", default=None, help="comma-separated subset of the domains")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="per domain")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--max-samples", type=int, default=None, help="at most this many samples per domain and split")
    p.add_argument("--steps-per-epoch", type=int, default=None, help="default: the largest domain's batches")
    p.add_argument("--backbone", default="resnet18", choices=["resnet18", "small"],
                   help="'small': a 2-stack ResNet (~0.4 M parameters) for quick runs")
    p.add_argument("--weights", default="auto",
                   help="keras_hub preset name or local preset dir with the backbone weights; 'none' = random "
                        "init; 'auto' (default) = resnet_18_imagenet for resnet18, none for small")
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--dropout", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=1e-5)
    p.add_argument("--select", default="val", choices=["val", "last"],
                   help="report the test accuracy of the best-validation epoch (LibMTL) or of the last one")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--stl", action="store_true", help="also train one single-task model per domain for Δp")
    p.add_argument("--stl-results", default=None, help="json of an earlier --stl run to reuse as the STL baseline")
    p.add_argument("--random-flip", action="store_true", help="horizontal-flip augmentation (not in the reference)")
    p.add_argument("--cache", action="store_true", help="keep decoded, resized images in memory")
    p.add_argument("--workers", type=int, default=1, help="loader threads")
    p.add_argument("--seed", type=int, default=None, help="one training seed (the same as --seeds SEED)")
    p.add_argument("--tag", default=None,
                   help="file name stem (default <dataset>_<balancer>_<backend>; with several settings or "
                        "seeds, _<setting>_seed<seed> is appended)")
    p.add_argument("--verbose", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    """Checks every argument, then trains each balancer setting and seed (``applications.experiment``); the STL
    models (``--stl``) are trained once, with the first run, and reused by the others. Returns the summary of
    the last run, with the runner's ``experiment`` (runs, grid winners, table) added."""
    args = parse_args(argv)
    if args.seed is not None:
        if args.seeds is not None:
            raise SystemExit("python -m applications.office: error: give --seed or --seeds, not both")
        args.seeds = [args.seed]
    try:
        experiment.apply_backend(args.backend)
        from applications.office import data, train

        spec = data.dataset_spec(args.dataset)
        plan = experiment.plan_from_args(args)
    except (experiment.ExperimentError, ValueError) as err:
        raise SystemExit(f"python -m applications.office: error: {err}") from None
    dataset = next(k for k, v in data.DATASETS.items() if v is spec)

    if args.make_splits:
        data.make_splits(args.data_root, args.dataset, out_dir=args.split_dir, seed=plan.seeds[0])
    weights = experiment.backbone_weights(args.weights, "resnet_18_imagenet" if args.backbone == "resnet18" else None)
    single = len(plan.settings) == 1 and len(plan.seeds) == 1
    stl_json = [args.stl_results]
    summaries = []

    def train_one(setting, seed):
        tag = experiment.run_tag(args.tag or f"{dataset}_{setting.balancer}_{experiment.backend_name()}",
                                 setting, seed, single)
        summary = train.run(
            args.data_root, dataset=args.dataset, balancer=setting.balancer, stl=args.stl and not stl_json[0],
            stl_results=stl_json[0], out_dir=plan.out, tag=tag, balancer_args=setting.kwargs or None,
            domains=tuple(args.domains.split(",")) if args.domains else None,
            epochs=args.epochs, batch_size=args.batch_size, image_size=args.image_size,
            max_samples=args.max_samples, steps_per_epoch=args.steps_per_epoch, backbone=args.backbone,
            weights=weights, hidden_dim=args.hidden_dim, dropout=args.dropout, learning_rate=args.lr,
            weight_decay=args.weight_decay, select=args.select, eval_every=args.eval_every,
            split_dir=args.split_dir, seed=seed, cache=args.cache, random_flip=args.random_flip,
            workers=args.workers, verbose=args.verbose)
        if args.stl and not stl_json[0]:
            stl_json[0] = f"{plan.out}/{tag}.json"  # the STL models of the first run serve every later one
        print(summary["markdown"])
        summaries.append(summary)
        return {k: v for k, v in summary.items() if k != "model"}

    done = experiment.run_plan(plan, train_one, meta=dict(command=["python", "-m", "applications.office"]
                                                              + list(argv or sys.argv[1:])))
    if not single:
        print(done["table"])
    summary = summaries[-1]
    summary["experiment"] = done
    return summary


if __name__ == "__main__":
    main()

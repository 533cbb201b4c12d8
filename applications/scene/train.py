"""Training, evaluation and results tables for NYUv2 and Cityscapes, shared by both command lines.

Protocol (the paper's Section 4.1, LibMTL's `examples/nyu` and `examples/cityscapes`):

- Adam, learning rate 1e-4 halved after 100 of 200 epochs, weight decay 1e-5 coupled as in `torch.optim.Adam`
  (an L2 penalty `1e-5 / 2 * ||w||^2` on every trainable variable, added to the update outside the balancing);
  batch 8 (NYUv2) / 64 (Cityscapes) / 2 (NYUv2 SegNet), last incomplete batch dropped.
- Losses: pixel cross-entropy ignoring label -1, L1 depth over pixels with depth != 0, 1 - cosine over pixels
  with a non-zero normal (`keras_dbmtl.losses`).
- Metrics on the test split (`val/` on disk): mIoU and pixel accuracy, depth absolute and relative error,
  normal angle mean / median and share of pixels within 11.25 / 22.5 / 30 degrees (`keras_dbmtl.metrics`).
- Model selection: the reference evaluates the test split after every epoch and reports the epoch whose
  results improve most on the first epoch's (`select="best"`, the default here too, so that numbers compare
  with the paper's); `select="last"` reports the last epoch.
- Δp (Eq. 3): against single-task models trained by the same command (`stl=True`: one model per task, same
  architecture and settings, equal weighting), or an earlier run's json (`stl_results`), or else the STL row
  printed in the paper.
"""

import json
import time

import keras
import numpy as np

import keras_dbmtl
from keras_dbmtl import losses as mtl_losses
from keras_dbmtl import metrics as mtl_metrics

from applications.common import add_weight_decay, write_results
from applications.scene.data import SceneDataset, make_tf_dataset, tf_data_errors_unwrapped
from applications.scene.models import SIZE_MULTIPLE, build_scene_model

# Log-key suffix of each keras_dbmtl metric -> column of the paper's tables (and of tests/data/paper_tables/*.csv).
COLUMNS = {
    "segmentation": [("miou", "seg_mIoU"), ("pixel_acc", "seg_PAcc")],
    "depth": [("abs_err", "depth_AErr"), ("rel_err", "depth_RErr")],
    "normal": [("angle_mean", "normal_mean"), ("angle_median", "normal_median"),
               ("within_11_25", "normal_11.25"), ("within_22_5", "normal_22.5"), ("within_30", "normal_30")],
}


def task_losses(tasks):
    makers = {"segmentation": lambda: mtl_losses.SegmentationCrossEntropy(ignore_index=-1),
              "depth": mtl_losses.DepthL1Loss, "normal": mtl_losses.NormalCosineLoss}
    return {task: makers[task]() for task in tasks}


def task_metrics(tasks):
    """{task: [metrics]} logged as `<task>_<suffix>` (Keras prefixes the output name only with several outputs,
    so a single-task model names its metrics in full)."""
    made = {}
    for task, outputs in tasks.items():
        names = [(f"{task}_" if len(tasks) == 1 else "") + suffix for suffix, _ in COLUMNS[task]]
        if task == "segmentation":
            made[task] = [mtl_metrics.SegmentationMIoU(outputs, ignore_index=-1, name=names[0]),
                          mtl_metrics.SegmentationPixelAccuracy(outputs, ignore_index=-1, name=names[1])]
        elif task == "depth":
            made[task] = [mtl_metrics.DepthAbsError(name=names[0]), mtl_metrics.DepthRelError(name=names[1])]
        else:
            made[task] = [mtl_metrics.NormalAngleMean(name=names[0]), mtl_metrics.NormalAngleMedian(name=names[1]),
                          mtl_metrics.NormalWithinAngle(11.25, name=names[2]),
                          mtl_metrics.NormalWithinAngle(22.5, name=names[3]),
                          mtl_metrics.NormalWithinAngle(30.0, name=names[4])]
    return made


def metric_keys(tasks):
    """{task: [log keys]} of the table metrics, e.g. {"depth": ["depth_abs_err", "depth_rel_err"]}."""
    return {task: [f"{task}_{suffix}" for suffix, _ in COLUMNS[task]] for task in tasks}


def select_epoch(history, tasks, select="best"):
    """Index of the reported epoch among those with test results.

    "best": the epoch whose test results improve most (Δp) on the first evaluated epoch's (the reference's rule);
    "last": the last evaluated epoch.
    """
    keys = metric_keys(tasks)
    first_key = "val_" + keys[next(iter(tasks))][0]
    evaluated = [i for i, value in enumerate(history.get(first_key, [])) if value is not None]
    if not evaluated:
        raise ValueError("No epoch was evaluated on the test split.")
    if select == "last":
        return evaluated[-1]
    if select != "best":
        raise ValueError(f"select must be 'best' or 'last', got {select!r}.")
    base = {task: {k: history["val_" + k][evaluated[0]] for k in ks} for task, ks in keys.items()}
    if any(v == 0 for metrics in base.values() for v in metrics.values()):
        return evaluated[-1]
    gains = [mtl_metrics.delta_p({k: history["val_" + k][i] for ks in keys.values() for k in ks}, base)
             for i in evaluated]
    return evaluated[int(np.argmax(gains))]


def make_datasets(data_root, tasks, loader, batch_size, eval_batch_size, augment=False, max_samples=None,
                  image_size=None, seed=0, workers=0):
    """(train, test, steps per epoch, (height, width)) for a loader kind ("pydataset" or "tf")."""
    common = dict(tasks=tasks, max_samples=max_samples, image_size=image_size, seed=seed)
    if loader == "tf":
        train = make_tf_dataset(data_root, "train", batch_size=batch_size, augment=augment, **common)
        test = make_tf_dataset(data_root, "test", batch_size=eval_batch_size, **common)
        return train, test, int(train.cardinality()), tuple(train.element_spec[0].shape[1:3])
    if loader != "pydataset":
        raise ValueError(f"loader must be 'pydataset' or 'tf', got {loader!r}.")
    if workers:
        common.update(workers=workers, use_multiprocessing=False)
    train = SceneDataset(data_root, "train", batch_size=batch_size, augment=augment, **common)
    test = SceneDataset(data_root, "test", batch_size=eval_batch_size, **common)
    return train, test, len(train), train.source.image_size


def train_scene(data_root, tasks, arch="hps", balancer="ew", balancer_args=None, epochs=200, batch_size=8,
                eval_batch_size=None, learning_rate=1e-4, weight_decay=1e-5, lr_decay_epoch=100, augment=False,
                image_size=None, max_samples=None, backbone="resnet50", weights=None, head_channels=256,
                segnet_width=64, output_stride=8, select="best", eval_every=1, seed=0, loader="pydataset",
                workers=0, verbose=1, callbacks=None):
    """Trains one `MultiTaskModel` over `tasks` ({task: outputs}; one task = a single-task model).

    `loader`: "pydataset" (`SceneDataset`, `workers` threads) or "tf" (`make_tf_dataset`). Returns a dict:
    `test` ({log key: value} at the selected epoch), `epoch` (1-based), `history`, `seconds`, `model`.
    """
    tasks = dict(tasks)
    if seed is not None:
        keras.utils.set_random_seed(seed)
    train, test, steps_per_epoch, (height, width) = make_datasets(
        data_root, tasks, loader, batch_size, eval_batch_size or batch_size, augment=augment,
        max_samples=max_samples, image_size=image_size, seed=seed, workers=workers)
    multiple = SIZE_MULTIPLE[arch]
    if height % multiple or width % multiple:
        raise ValueError(f"The {arch} model needs image sizes divisible by {multiple}; the images are "
                         f"{height}x{width} (use image_size to resize them).")
    model = build_scene_model(tasks, arch=arch, backbone=backbone, weights=weights, head_channels=head_channels,
                              segnet_width=segnet_width, output_stride=output_stride)
    model.build((None, height, width, 3))
    add_weight_decay(model.trainable_variables, weight_decay)
    decay_step = max(int(lr_decay_epoch), 0) * steps_per_epoch
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay([decay_step], [learning_rate, learning_rate / 2])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=schedule), loss=task_losses(tasks),
                  metrics=task_metrics(tasks), balancer=keras_dbmtl.balancers.get(balancer, **(balancer_args or {})))
    every = max(int(eval_every), 1)
    started = time.time()
    with tf_data_errors_unwrapped():  # a bad file raises the loader's DataError with the tf.data loader too
        history = model.fit(train, epochs=epochs, validation_data=test, validation_freq=every,
                            callbacks=list(callbacks or []), verbose=verbose).history
    seconds = time.time() - started
    # Keras leaves the epochs without test results out of the val_ series: put them back as None.
    val_epochs = [e for e in range(epochs) if (e + 1) % every == 0]
    if not val_epochs or val_epochs[-1] != epochs - 1:
        with tf_data_errors_unwrapped():
            results = model.evaluate(test, return_dict=True, verbose=0)
        for key, value in results.items():
            history.setdefault("val_" + key, []).append(value)
        val_epochs.append(epochs - 1)
    aligned = {}
    for key, values in history.items():
        values = [float(v) for v in values]
        if key.startswith("val_"):
            series = [None] * epochs
            for epoch, value in zip(val_epochs, values):
                series[epoch] = value
            values = series
        aligned[key] = values
    chosen = select_epoch(aligned, tasks, select)
    test_results = {k: aligned["val_" + k][chosen] for ks in metric_keys(tasks).values() for k in ks}
    return {"tasks": tasks, "test": test_results, "epoch": chosen + 1, "history": aligned,
            "seconds": seconds, "model": model}


def results_table(rows, tasks):
    """Markdown table with the paper's columns; rows: list of (method, {log key: value}, delta_p or None)."""
    columns = [(f"{task}_{suffix}", column) for task in tasks for suffix, column in COLUMNS[task]]
    header = ["method"] + [column for _, column in columns] + ["delta_p"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values, dp in rows:
        cells = [method] + [_format(values.get(key), column) for key, column in columns]
        cells.append("" if dp is None else f"{dp:+.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value, column):
    if value is None:
        return ""
    return f"{value:.4g}" if column.startswith("depth_") else f"{value:.2f}"  # as the paper: 0.3926, 0.01282


def paper_baseline(preset, arch, tasks):
    """The paper's STL row for this preset and architecture, as {task: {log key: value}} (or None)."""
    row = preset.get("paper_stl", {}).get(arch)
    if not row:
        return None
    return {task: {f"{task}_{suffix}": row[column] for suffix, column in COLUMNS[task]} for task in tasks}


def run(preset, data_root, balancer="dbmtl", stl=False, stl_results=None, out_dir="results/scene", tag=None,
        tasks=None, **train_kwargs):
    """One table row (and the STL rows with `stl=True`): trains, evaluates, writes `<out_dir>/<tag>.json/.md`.

    Args:
        preset: a dataset preset (`applications.nyuv2.NYUV2`, `applications.cityscapes.CITYSCAPES`).
        data_root: folder holding `train/` and `val/`.
        balancer: registered balancer name (`keras_dbmtl.balancers.names()`).
        stl: also train one single-task model per task (the Δp baseline).
        stl_results: json of an earlier run whose STL results to reuse.
        tasks: subset of the preset's task names (default: all).
        **train_kwargs: `train_scene` arguments (arch, epochs, batch_size, ...).
    """
    all_tasks = preset["tasks"]
    tasks = {t: all_tasks[t] for t in (tasks or all_tasks)}
    arch = train_kwargs.get("arch", "hps")
    backend = keras.backend.backend()
    tag = tag or f"{preset['name']}_{arch}_{balancer}_{backend}"
    summary = {"dataset": preset["name"], "arch": arch, "balancer": balancer, "backend": backend,
               "tasks": tasks, "config": {k: v for k, v in train_kwargs.items() if k != "callbacks"}}
    summary["config"]["data_root"] = str(data_root)

    baseline, stl_source = None, None
    if stl:
        stl_values, stl_runs = {}, {}
        for task in tasks:
            result = train_scene(data_root, {task: tasks[task]}, balancer="ew", **train_kwargs)
            stl_values.update(result["test"])
            stl_runs[task] = {"epoch": result["epoch"], "seconds": result["seconds"], "history": result["history"]}
        summary["stl_runs"] = stl_runs
        baseline = {task: {k: stl_values[k] for k in keys} for task, keys in metric_keys(tasks).items()}
        stl_source = "trained by this command (one model per task, same settings, equal weighting)"
    elif stl_results:
        with open(stl_results, encoding="utf-8") as handle:
            baseline = json.load(handle)["stl"]["test"]
        baseline = {task: baseline[task] for task in tasks}
        stl_source = f"from {stl_results}"

    mtl = train_scene(data_root, tasks, balancer=balancer, **train_kwargs)
    if baseline is None:
        baseline = paper_baseline(preset, arch, tasks)
        stl_source = "the paper's STL row (not trained here)" if baseline else None
    dp = per_task = None
    if baseline is not None and all(v != 0 for m in baseline.values() for v in m.values()):
        dp = mtl_metrics.delta_p(mtl["test"], baseline)
        per_task = mtl_metrics.delta_p_per_task(mtl["test"], baseline)
    flat_baseline = {k: v for m in (baseline or {}).values() for k, v in m.items()}
    rows = ([("STL", flat_baseline, 0.0)] if baseline else []) + [(str(balancer).upper(), mtl["test"], dp)]
    summary.update({
        "test": mtl["test"], "selected_epoch": mtl["epoch"], "delta_p": dp, "delta_p_per_task": per_task,
        "seconds": mtl["seconds"], "history": mtl["history"],
        "stl": {"test": baseline, "source": stl_source},
        "table": {column: mtl["test"][f"{task}_{suffix}"] for task in tasks for suffix, column in COLUMNS[task]},
    })
    summary["table"]["delta_p"] = dp
    select = train_kwargs.get("select", "best")
    markdown = (f"### {preset['title']} - {arch}, {balancer} ({backend})\n\n" + results_table(rows, tasks)
                + f"\nTest split, epoch {mtl['epoch']} "
                + ("(best Δp over the first epoch)" if select == "best" else "(last)")
                + (f"; Δp against STL {stl_source}.\n" if stl_source else "; no STL baseline.\n"))
    summary["markdown"] = markdown
    if out_dir:
        write_results(out_dir, tag, summary, markdown)
    summary["model"] = mtl["model"]
    return summary

"""Pieces every application's command line and training script share.

```python
from applications.common import parse_balancer_args, add_weight_decay, write_results
parse_balancer_args("beta=0.5,scaling=mean")        # {'beta': 0.5, 'scaling': 'mean'}
```

The loaders of every application raise `DataError` (a `ValueError`) for bad input files, and `MissingDataError`
(also a `FileNotFoundError`) for absent ones: a missing file, a truncated or undecodable file, an array of the
wrong shape, a cache written by another version. The message names the file and says what to do; a loader
never returns a batch built from such a file.

Nothing here imports Keras at module level, so that a command line can still choose the backend.
"""

import json
import os


class DataError(ValueError):
    """A dataset file is unusable (truncated, corrupt, wrong shape or type, written by another version).

    The message names the file and says how to fix it. Subclass of `ValueError`, so code that caught the
    loaders' former `ValueError`s still does.
    """


class MissingDataError(DataError, FileNotFoundError):
    """A dataset file or folder the loader needs does not exist (both a `DataError` and a `FileNotFoundError`)."""


def parse_balancer_args(text):
    """'beta=0.5,beta_sigma=0.5' -> {'beta': 0.5, 'beta_sigma': 0.5} (values read as JSON when they parse)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, separator, value = item.partition("=")
        if not separator or not key.strip():
            raise ValueError(f"--balancer-args takes key=value pairs separated by commas, got {item!r} in {text!r}.")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_weight_decay(variables, weight_decay):
    """PyTorch-style (coupled) weight decay: an L2 penalty `weight_decay / 2 * ||w||^2` on each variable (its
    gradient is `weight_decay * w`, what `torch.optim.Adam(weight_decay=...)` adds). `MultiTaskModel` adds such
    penalties to the update once, outside the balancing, as LibMTL's optimizer does."""
    import keras

    if not weight_decay:
        return
    penalty = keras.regularizers.L2(weight_decay / 2.0)
    for variable in variables:
        variable.regularizer = penalty


def write_results(out_dir, tag, summary, markdown):
    """Writes `<out_dir>/<tag>.json` (the summary) and `<out_dir>/<tag>.md` (its table); returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    json_path, markdown_path = os.path.join(out_dir, f"{tag}.json"), os.path.join(out_dir, f"{tag}.md")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1, default=str)
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write(markdown)
    return json_path, markdown_path

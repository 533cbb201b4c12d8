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
import platform
import sys


class DataError(ValueError):
    """A dataset file is unusable (truncated, corrupt, wrong shape or type, written by another version).

    The message names the file and says how to fix it. Subclass of `ValueError`, so code that caught the
    loaders' former `ValueError`s still does.
    """


class MissingDataError(DataError, FileNotFoundError):
    """A dataset file or folder the loader needs does not exist (both a `DataError` and a `FileNotFoundError`)."""


MALLOC_TUNABLES = ("glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=8589934592:"
                   "glibc.malloc.arena_max=2")
"""glibc malloc settings for training processes: blocks up to 4 GB come from the heap (not a fresh ``mmap``
each), up to 8 GB of freed memory stays with the process (its resident size stays at its peak), two malloc
arenas. XLA on CPU allocates one block for a step's temporaries (tens to hundreds of MB) and frees it after the
step; with glibc's defaults that block is mapped and unmapped every step and each of its pages faults anew.
Measured on the QM9 quick preset (JAX, 2 shared CPU cores, CPU time per training step): DB-MTL 443 -> 266 ms,
minor faults 83,000 -> 2,000, kernel share 38 % -> 2.6 %; EW 62 -> 36 ms, 10,500 -> 0 faults, 34 % -> 1.1 %."""


def wants_malloc_tunables(environ):
    """Whether a process started with `environ` gets MALLOC_TUNABLES: on glibc Linux, unless `environ` already sets
    GLIBC_TUNABLES (yours are kept) or KERAS_DBMTL_MALLOC_TUNING=0."""
    if environ.get("KERAS_DBMTL_MALLOC_TUNING", "1") == "0" or "GLIBC_TUNABLES" in environ:
        return False
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def rerun_with_malloc_tunables():
    """Re-executes this Python process with ``GLIBC_TUNABLES=MALLOC_TUNABLES`` (read by glibc only at process
    start; ``mallopt`` cannot raise the mmap threshold above 32 MB). Call it first thing in a command line's
    ``if __name__ == "__main__":``. Does nothing (returns False) off glibc Linux, when ``GLIBC_TUNABLES`` is
    already set (yours are kept), or with ``KERAS_DBMTL_MALLOC_TUNING=0``."""
    if not wants_malloc_tunables(os.environ):
        return False
    argv = getattr(sys, "orig_argv", None)
    if not argv:
        return False
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, dict(os.environ, GLIBC_TUNABLES=MALLOC_TUNABLES))
    return True  # not reached


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

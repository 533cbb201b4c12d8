"""The runnable example in each architecture's module docstring runs (and its own asserts hold)."""

import re
import textwrap

import pytest

from keras_dbmtl import architectures, callbacks
from keras_dbmtl.architectures import base, cgc, cross_stitch, dselect_k, mmoe, mtan, ple

MODULES = [architectures, base, mmoe, cgc, ple, dselect_k, cross_stitch, mtan]


def examples(doc):
    return [textwrap.dedent(b) for b in re.findall(r"```python\n(.*?)```", textwrap.dedent(doc), flags=re.S)]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_module_example_runs(module):
    blocks = examples(module.__doc__)
    assert len(blocks) == 1
    exec(compile(blocks[0], module.__name__, "exec"), {})


def test_monitor_example_runs(capsys):
    blocks = examples(callbacks.TaskBalanceMonitor.__doc__)
    assert len(blocks) == 1
    exec(compile(blocks[0], "TaskBalanceMonitor", "exec"), {})
    assert "[" in capsys.readouterr().out

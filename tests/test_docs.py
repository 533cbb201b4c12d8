"""Every code example of the documentation runs, and the README's quickstart table is the stored one.

Each page of `docs/` (and the README) is one test: its ```python blocks run in order in one namespace, in a
fresh temporary folder, on the JAX backend (the module is skipped on the others: the examples are backend
neutral and CI runs the suite once per backend). A block may be skipped only if it needs what CI does not have,
with the reason on the line before it:

    <!-- docs-test: skip (needs torchrun and two processes) -->

The examples are written small (a few hundred samples, one or two epochs), so no variable shrinks them; a page
whose example grows can read `KERAS_DBMTL_DOCS_QUICK` (set to "1" here) to pick smaller shapes.

The site build itself (`bash docs/build`: strict, generated reference and tables) runs once in `.ci/run`, not here.
"""

import re
import sys
import time
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

pytestmark = pytest.mark.skipif(keras.backend.backend() != "jax",
                                reason="the documentation examples run on the JAX backend")

FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ ]*$", re.M | re.S)
SKIP = re.compile(r"<!-- docs-test: skip \((?P<reason>[^)]*)\) -->\s*$")


def pages():
    found = sorted(p for p in DOCS.rglob("*.md") if "scripts" not in p.parts)
    return found + [ROOT / "README.md"]


def python_blocks(path):
    """(line number, code, skip reason or None) of every ```python block of a page."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match["lang"] != "python":
            continue
        before = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        if skip is not None and not skip["reason"].strip():
            raise AssertionError(f"{path}: a skipped block must say why")
        body = "\n".join(line[len(match["indent"]):] for line in match["body"].splitlines())
        blocks.append((text[:match.start()].count("\n") + 2, body, skip and skip["reason"]))
    return blocks


PAGES = [p for p in pages() if python_blocks(p)]


def test_the_examples_are_found():
    assert len(PAGES) >= 8, PAGES
    assert ROOT / "README.md" in PAGES


def test_a_skip_marker_needs_a_reason(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip () -->\n```python\nprint(1)\n```\n")
    with pytest.raises(AssertionError, match="must say why"):
        python_blocks(page)
    page.write_text("text\n<!-- docs-test: skip (needs two GPUs) -->\n```python\nprint(1)\n```\n"
                    "    ```python\n    x = 1\n    ```\n")
    assert python_blocks(page) == [(4, "print(1)", "needs two GPUs"), (7, "x = 1", None)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_DBMTL_DOCS_QUICK", "1")
    monkeypatch.setattr(sys, "argv", [str(page)])
    keras.utils.clear_session()
    namespace = {"__name__": "__docs__"}
    for line, code, skip in python_blocks(page):
        if skip:
            continue
        start = time.perf_counter()
        try:
            exec(compile(code, f"{page.relative_to(ROOT)}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - the page and line of the failing example, then the error
            raise AssertionError(f"the example at {page.relative_to(ROOT)}, line {line}, failed: {error!r}") from error
        print(f"{page.relative_to(ROOT)}:{line}: {time.perf_counter() - start:.1f} s")


def test_readme_quickstart_table_is_the_stored_one():
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        import tables
    finally:
        sys.path.remove(str(DOCS / "scripts"))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert tables.readme_block() in readme, (
        "README.md's quickstart table differs from benchmarks/results/quickstart/*.json: run "
        "`python docs/scripts/tables.py quickstart --write-readme`")


def test_site_sources_name_no_missing_page():
    """Every page of mkdocs.yml's nav exists (the strict build checks the rest)."""
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = re.findall(r"^\s+- [^:\n]+:\s+([\w/.-]+\.md)\s*$", config[config.index("\nnav:"):], flags=re.M)
    assert nav and all((DOCS / p).exists() for p in nav), [p for p in nav if not (DOCS / p).exists()]



def test_every_public_object_has_a_docstring():
    """The rule the site build enforces (docs/scripts/hooks.py), checked statically here too: seconds, no build."""
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        import api
    finally:
        sys.path.remove(str(DOCS / "scripts"))
    assert api.missing_docstrings() == []
    names = {b["name"] for b in api.balancers()}
    from keras_dbmtl import balancers
    assert names == set(balancers.names())          # the static reading finds every registered balancer
    assert {b["kind"] for b in api.balancers()} <= {"loss", "Gramian", "Jacobian"}

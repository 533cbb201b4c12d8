"""Writes the generated part of the site at build time (mkdocs-gen-files runs it; nothing here is committed):

- `reference/`: one page per public module of `keras_dbmtl` (docs/scripts/api.py finds them statically), its
  navigation (`reference/SUMMARY.md`, read by literate-nav), and for every registered balancer a page with its
  kind, hyperparameters and their allowed ranges, state, tests and paper, above its docstring and equations;
- `assets/`: the stored figures of the benchmarks, the QM9 runs and the quickstart, copied from the repository;
- `source/`: the test files the balancer pages link to, as pages (there is no repository URL to link to).

A new module or a new `@register`ed balancer appears without editing anything here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mkdocs_gen_files

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api  # noqa: E402
import tables  # noqa: E402

ROOT = api.ROOT
BALANCER_MODULES = {f"keras_dbmtl.balancers.{b['module']}": b for b in api.balancers()}


def page_of(module_path):
    """reference/... path of a module's page (a package's page is its index.md)."""
    parts = module_path.split(".")[1:]
    module = api._module(module_path)
    if module.is_package or module.is_subpackage:
        return "/".join(["reference", *parts, "index.md"])
    return "/".join(["reference", *parts]) + ".md"


def _relative(from_page, to_path):
    depth = from_page.count("/")
    return "../" * depth + to_path


def source_page(path):
    """A repository file shown as a page under source/ (written once); returns its docs path."""
    page = f"source/{path}.md"
    if page not in _written:
        text = (ROOT / path).read_text(encoding="utf-8")
        fence = "````" if "```" in text else "```"
        with mkdocs_gen_files.open(page, "w") as fh:
            fh.write(f"# `{path}`\n\nThe file as stored in the repository when this site was built.\n\n"
                     f"{fence}python\n{text}\n{fence}\n")
        _written.add(page)
    return page


_written = set()


def balancer_header(b, page):
    kind_class = {"loss": "LossBalancer", "Gramian": "GramianBalancer", "Jacobian": "JacobianBalancer"}[b["kind"]]
    tests = ", ".join(f"[`{t}`]({_relative(page, source_page(t))})" for t in b["tests"]) or "—"
    automatic = ("every registered balancer is also run by `tests/balancers/test_properties.py`, "
                 "`test_registry.py`, `test_hypothesis.py` and `test_balancers_fit.py`")
    paper = "— (no paper: a baseline)" if not b["citation"] else f"{b['citation']} — [find the paper]({b['paper_url']})"
    state = ", ".join(f"`{n}` ({shape}{', learned by the optimizer' if k == 'learned' else ''})"
                      for n, shape, k in b["state"]) or "none besides the step counter"
    rows = [
        f"# `{b['name']}`: {b['class']}", "",
        b["summary"], "",
        "| | |", "|---|---|",
        f"| use | `compile(balancer=\"{b['name']}\")` or `keras_dbmtl.balancers.{b['class']}(...)` |",
        f"| kind | **{b['kind']}** ([`{kind_class}`][keras_dbmtl.balancers.base.{kind_class}]): "
        f"{api.COST[b['kind']]} per step |",
        f"| state (saved with the model) | {state} |",
        f"| paper | {paper} |",
        f"| tests | {tests}; {automatic} |",
        f"| cost and QM9 results | the [balancer chooser]({_relative(page, 'chooser.md')}) |", "",
        "## Hyperparameters", "",
        "Defaults are the paper's (or its official code's); a value outside the allowed range raises a "
        "`ValueError` naming it (`keras_dbmtl/balancers/_checks.py`).", "",
        "| argument | default | allowed |", "|---|---|---|",
    ]
    for name, default, allowed in b["parameters"]:
        rows.append(f"| `{name}` | `{default}` | {allowed or 'not range-checked'} |")
    rows += ["", "## Method", ""]
    return "\n".join(rows)


def module_page(module_path, page):
    module = api._module(module_path)
    if module_path in BALANCER_MODULES:
        b = BALANCER_MODULES[module_path]
        return (balancer_header(b, page) + f"\n::: {module_path}\n    options:\n      show_root_heading: false\n"
                f"      members: [{b['class']}]\n      heading_level: 3\n")
    if module.is_package or module.is_subpackage:
        lines = [f"# `{module_path}`", "", f"::: {module_path}", "    options:",
                 "      show_root_heading: false", "      show_submodules: false", ""]
        objects = api.public_objects(module_path)
        if objects:
            lines += ["## Public objects", ""]
            lines += [f"- [`{p.rsplit('.', 1)[1]}`][{p}] (`{p}`)" for p in objects]
        children = [m for m in api.public_modules() if m.rsplit(".", 1)[0] == module_path]
        if children:
            lines += ["", "## Modules", ""]
            lines += [f"- [`{c}`]({_relative(page, page_of(c))})" for c in children]
        return "\n".join(lines) + "\n"
    return f"# `{module_path}`\n\n::: {module_path}\n    options:\n      show_root_heading: false\n"


def reference():
    nav = mkdocs_gen_files.Nav()
    for module_path in api.public_modules():
        page = page_of(module_path)
        with mkdocs_gen_files.open(page, "w") as fh:
            fh.write(module_page(module_path, page))
        parts = tuple(module_path.split("."))
        nav[parts] = page[len("reference/"):]
    with mkdocs_gen_files.open("reference/SUMMARY.md", "w") as fh:
        fh.writelines(nav.build_literate_nav())


def copy(source, target):
    with mkdocs_gen_files.open(target, "wb") as fh:
        fh.write(source.read_bytes())


def assets():
    for png in sorted((ROOT / "benchmarks" / "figures").glob("*.png")):
        copy(png, f"assets/benchmarks/{png.name}")
    for folder in tables.QM9_PRESETS:
        for png in sorted((tables.QM9 / folder).glob("*.png")):
            copy(png, f"assets/qm9/{folder}/{png.name}")
    figure = tables.QUICKSTART / "quickstart.png"
    if figure.exists():
        copy(figure, "assets/quickstart/quickstart.png")


reference()
assets()

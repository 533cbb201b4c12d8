"""MkDocs hooks of the site (mkdocs.yml: `hooks:`).

- before the build: every public module and object of `keras_dbmtl` must have a docstring (docs/scripts/api.py
  says what is public and lists the few exemptions with their reason); one without fails the build;
- in every page: a marker line `<!-- gen:NAME -->` becomes the table `docs/scripts/tables.py` makes from the
  stored results (`GENERATORS[NAME]`); an unknown NAME fails the build;
- after the build: every public class and function must have been rendered on some page (an HTML element whose id is its
  dotted path, as mkdocstrings writes them); one without a page fails the build.
"""

from __future__ import annotations

import logging
import re
import sys
from pathlib import Path

from mkdocs.exceptions import PluginError

sys.path.insert(0, str(Path(__file__).resolve().parent))
import api  # noqa: E402
import tables  # noqa: E402

# Warnings known to be harmless, each with its reason; every other warning fails the strict build.
KNOWN_WARNINGS = {
    # keras_dbmtl/plotting.py's module docstring writes the JSON path "runs"[run]["history"] without backticks,
    # which Markdown reads as a reference link [run]["history"]; it renders as the text it is.
    "mkdocs.plugins.mkdocs_autorefs._internal.plugin": re.compile(r"plotting\.py:1: .*Could not find cross-reference target '\"history\"'"),
}


class _Known(logging.Filter):
    def __init__(self, pattern):
        super().__init__()
        self.pattern = pattern

    def filter(self, record):
        return not self.pattern.search(record.getMessage())


for _logger, _pattern in KNOWN_WARNINGS.items():
    logging.getLogger(_logger).addFilter(_Known(_pattern))

MARKER = re.compile(r"^<!-- gen:([a-z0-9_-]+) -->$", re.M)
ANCHOR = re.compile(r'id="(keras_dbmtl[\w.]*)"')
_rendered = set()


def on_pre_build(config):
    _rendered.clear()
    missing = api.missing_docstrings()
    if missing:
        raise PluginError("Public objects without a docstring (write one, or see UNDOCUMENTED_OK in "
                          "docs/scripts/api.py):\n  " + "\n  ".join(missing))


def _depth_prefix(page):
    return "../" * page.file.src_uri.count("/")


def on_page_markdown(markdown, page, config, files):
    def replace(match):
        name = match.group(1)
        if name not in tables.GENERATORS:
            raise PluginError(f"{page.file.src_uri}: unknown generated table {name!r}; known: {sorted(tables.GENERATORS)}")
        text = tables.GENERATORS[name]()
        # the generated links are relative to the site root; make them relative to this page
        prefix = _depth_prefix(page)
        return re.sub(r"\]\(((?:reference|assets|source)/[^)]+)\)", lambda m: f"]({prefix}{m.group(1)})", text)

    return MARKER.sub(replace, markdown)


def on_page_content(html, page, config, files):
    _rendered.update(ANCHOR.findall(html))
    return html


def on_post_build(config):
    expected = {path for module in api.public_modules() for path in api.public_objects(module)}
    without_page = sorted(expected - _rendered)
    if without_page:
        raise PluginError("Public objects with no page in the API reference:\n  " + "\n  ".join(without_page))

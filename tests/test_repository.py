"""A clone from anywhere runs every test: the facts the tests need are inside the repository, and no file of the
project names a folder of one particular machine."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = ROOT / "tests" / "data" / "paper_tables"
PAPER_TABLES = ("nyuv2_deeplabv3plus_table1.csv", "cityscapes_table2.csv", "qm9_table3.csv",
                "office31_table4.csv", "officehome_table4.csv", "ablation_table5.csv", "nyuv2_segnet_table6.csv")
# A folder outside the repository: the machine this project was written on, a user's home, a sibling checkout.
LOCAL_PATH = re.compile("|".join([r"/" + "work/", r"\.\./" + "shared", r"/" + r"home/\w", r"/" + r"Users/\w"]))
TEXT_SUFFIXES = {".py", ".md", ".toml", ".json", ".txt", ".csv", ".cfg", ".yml", ".yaml", ".sh", ""}
SKIPPED_DIRS = {".hypothesis", ".git", ".venv", "__pycache__", "node_modules"}


def _project_files():
    for path in ROOT.rglob("*"):
        parts = set(path.relative_to(ROOT).parts)
        if path.is_file() and not parts & SKIPPED_DIRS and path.suffix in TEXT_SUFFIXES \
                and not any(p.endswith(".egg-info") for p in parts):
            yield path


def test_paper_tables_are_in_the_repository_with_their_source():
    for name in PAPER_TABLES:
        lines = (TABLES / name).read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("# Seed paper Table"), name
        assert lines[1].startswith(("method,", "log,maxnorm,")) and len(lines) > 3, name
    readme = (TABLES / "README.md").read_text(encoding="utf-8")
    assert "Dual-Balancing for Multi-Task Learning" in readme and "arXiv:2308.12029" in readme


def test_no_file_names_a_local_machine_path():
    offenders = []
    for path in _project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if LOCAL_PATH.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)

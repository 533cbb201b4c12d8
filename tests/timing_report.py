"""Where the test suite's time goes: per backend, setup / call / teardown, and the slowest files and tests.

    bash .ci/test --durations                 # runs the suite and prints this report at the end
    .venv/bin/python tests/timing_report.py .ci/durations/*.json [--top 15]

Reads the files that `tests/conftest.py` writes when `KERAS_DBMTL_TEST_TIMINGS` names one (one per backend).
"""

import argparse
import collections
import json


def summarise(path, top):
    with open(path) as file:
        run = json.load(file)
    phases, files, tests = collections.Counter(), collections.Counter(), collections.Counter()
    counts = collections.Counter()
    for entry in run["tests"]:
        phases[entry["phase"]] += entry["seconds"]
        name = entry["test"].split("::")[0]
        files[name] += entry["seconds"]
        tests[entry["test"]] += entry["seconds"]
        counts[name] += entry["phase"] == "call"
    total = sum(phases.values())
    lines = [f"## {run['backend']}: {total:.0f} s in tests ({sum(counts.values())} tests) — "
             + ", ".join(f"{phase} {phases[phase]:.0f} s" for phase in ("setup", "call", "teardown"))]
    lines.append(f"  slowest files (s, tests):")
    lines += [f"  {seconds:8.1f} {counts[name]:4d}  {name}" for name, seconds in files.most_common(top)]
    lines.append(f"  slowest tests (s, all phases):")
    lines += [f"  {seconds:8.1f}  {name}" for name, seconds in tests.most_common(top)]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    for path in args.paths:
        print(summarise(path, args.top))


if __name__ == "__main__":
    main()

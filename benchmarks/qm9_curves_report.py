"""Merges the per-run JSON files of `benchmarks/qm9_curves.sh` (one process per balancer and seed): see
`applications/qm9/report.py`, which this runs.

    python benchmarks/qm9_curves_report.py applications/qm9/results_gpu_quick_80 [--title "..."]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from applications.qm9.report import main  # noqa: E402

if __name__ == "__main__":
    main()

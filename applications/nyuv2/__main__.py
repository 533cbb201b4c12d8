"""`python -m applications.nyuv2 --data-root DIR --balancer dbmtl --backend jax [--stl] ...` (see --help)."""

from applications.nyuv2 import NYUV2
from applications.scene.cli import main

if __name__ == "__main__":
    main(NYUV2)

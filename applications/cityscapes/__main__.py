"""`python -m applications.cityscapes --data-root DIR --balancer dbmtl --backend jax [--stl] ...` (see --help)."""

from applications.cityscapes import CITYSCAPES
from applications.scene.cli import main

if __name__ == "__main__":
    main(CITYSCAPES)

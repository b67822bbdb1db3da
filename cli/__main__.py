"""`python -m plait.cli`: what torchrun starts for each rank of `plait run --nproc N`."""

import sys

from .main import main

if __name__ == "__main__":  # importing the package's modules (tests) runs nothing
    sys.exit(main())

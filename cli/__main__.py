"""`python -m plait.cli`: what torchrun starts for each rank of `plait run --nproc N`."""

import sys

from .main import main

sys.exit(main())

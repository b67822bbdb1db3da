"""The `plait` command line: compile, opt, run, train, estimate, calibrate.

One module per command, each with its flags (`add_parser`) and what it does
(`run`); `parser` joins them, `common` holds what they share, `models`
resolves a MODEL argument or `--example NAME`. `main` is the console entry
point (`plait.cli:main`); `python -m plait.cli` runs it too, as torchrun
does for each rank of `plait run --nproc N` and `plait train --nproc N`.
"""

from .main import main

__all__ = ["main"]

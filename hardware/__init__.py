"""Hardware descriptions: data files, one per machine, read by the cost model."""

from .spec import Hardware, HardwareError, Link, available, load

__all__ = ["Hardware", "HardwareError", "Link", "available", "load"]

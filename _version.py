"""plait's version: read by the package, its build and the artifacts it writes."""

__version__ = "0.1.0"

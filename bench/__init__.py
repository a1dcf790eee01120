"""shiftbench: a benchmark harness for robustness under distribution shift."""

__version__ = "0.1.0"

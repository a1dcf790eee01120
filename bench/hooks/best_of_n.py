"""The ``best_of_n`` trial callback (reward over-optimisation probe); it lives in :mod:`shiftbench.bestofn`."""

from shiftbench.bestofn import BestOfN  # noqa: F401  (importing registers the callback)

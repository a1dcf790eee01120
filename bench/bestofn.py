"""Reward-model over-optimisation (best-of-n): the callback and its report sections live in one file,
:mod:`shiftbench.hooks.best_of_n`; this module keeps the names importable from here."""

from .hooks.best_of_n import (  # noqa: F401
    NS, RULES_SHOWN, BestOfN, best_of_n_curve, best_of_n_data, best_of_n_section, curve_key, plot_best_of_n,
    preference_rows, preference_section, record_curves)

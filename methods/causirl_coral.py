"""CausIRL with the CORAL distance: matching the feature means and covariances of two random halves of the batch."""

from __future__ import annotations

from shiftbench.methods.causirl_mmd import CausIRLMMD
from shiftbench.methods.coral import coral_discrepancy
from shiftbench.registry import METHODS


@METHODS.register("causirl_coral")
class CausIRLCORAL(CausIRLMMD):
    """CausIRL-CORAL (Chevalley, Bunne, Krause & Bauer, "Invariant Causal Mechanisms through Distribution
    Matching", arXiv:2206.11646, 2022): ``CausIRLMMD``'s two random halves, compared by ``coral_discrepancy``
    (mean squared differences of the feature means and covariances). Defaults and ranges are DomainBed's."""

    @staticmethod
    def discrepancy(x, y):
        return coral_discrepancy(x, y)

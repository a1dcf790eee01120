"""Conditional domain-adversarial training (CDANN)."""

from __future__ import annotations

from shiftbench.methods.dann import DANN
from shiftbench.registry import METHODS


@METHODS.register("cdann")
class CDANN(DANN):
    """CDANN (Li, Tian, Gong, Liu, Liu, Zhang & Tao, "Deep Domain Generalization via Conditional Invariant
    Adversarial Networks", ECCV 2018), as in DomainBed: ``DANN`` whose discriminator sees the features plus a learned
    embedding of the example's class, with each example's discriminator loss weighted by 1 / (its class's count ×
    the number of classes), so the features are matched per class, P(z | y, e) = P(z | y). Needs class labels,
    hence classification only. Same hyperparameters as DANN."""

    TASKS = ("classification",)
    CONDITIONAL = True

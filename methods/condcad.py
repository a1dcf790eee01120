"""Conditional CAD: the contrastive domain bottleneck within each class."""

from __future__ import annotations

from shiftbench.methods.cad import CAD
from shiftbench.registry import METHODS


@METHODS.register("condcad")
class CondCAD(CAD):
    """CondCAD (Ruan, Dubois & Maddison, "Optimal Representations for Covariate Shift", ICLR 2022): ``CAD`` with
    the conditional bottleneck, which contrasts an example only with others of its class and so minimises
    I(D; Z | Y), keeping label information the unconditional form may remove. Defaults and ranges are
    DomainBed's."""

    CONDITIONAL = True

"""Many trials in one program (issue 18): a sweep's compatible trials trained as one vectorised program.

``group_trials`` buckets trials that can share a program, ``choose_k`` picks the pack size for ``--pack auto``, and
``run_pack`` trains one pack, writing every trial's folder exactly as ``run_trial`` would. See docs/packing.md.
"""

from __future__ import annotations

from .engine import member_reason, run_pack
from .group import choose_k, group_trials, pack_key, packs_of, spec_reason

__all__ = ["choose_k", "group_trials", "member_reason", "pack_key", "packs_of", "run_pack", "spec_reason"]

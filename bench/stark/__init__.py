"""A hash-based, transparent, post-quantum zk-STARK for leaderboard scores: a proof that C of n committed
predictions equal the committed labels, verifiable without either (see docs/proofs.md).

Entry points: ``commit_column`` (a salted, masked commitment to a prediction or label vector), ``prove``,
``verify`` (returns the proven ``Statement`` or raises ``InvalidProof``), ``Params`` and ``soundness``.
"""

from .params import Params, layout, soundness
from .proofio import InvalidProof
from .prove import commit_column, prove
from .verify import Statement, verify

__all__ = ["InvalidProof", "Params", "Statement", "commit_column", "layout", "prove", "soundness", "verify"]

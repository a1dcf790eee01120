"""Trial callbacks that attest a finished trial (see :mod:`shiftbench.attest`): name one in a spec's ``callbacks``.

- ``attest``: Ed25519 (the default);
- ``attest_slhdsa``: SLH-DSA-SHA2-128f only (FIPS 205, hash-based, post-quantum);
- ``attest_hybrid``: both; verification then requires both signatures.

``on_end`` runs after predictions and weights are written and before ``final.json``: it writes the manifest, the
metrics, the envelope and the log receipt, and puts the envelope's sha256 into ``final["attestation"]``. Its high
``ORDER`` makes it run after every other callback, wherever it is named, so what they add is signed too.
"""

from __future__ import annotations

from typing import Any, ClassVar

from shiftbench.attest.dsse import ED25519, SLH_DSA  # light: cryptography loads on first signature
from shiftbench.registry import CALLBACKS
from shiftbench.callbacks import Callback, TrialRun


@CALLBACKS.register("attest")
class Attest(Callback):
    """Signs the trial's result with Ed25519 and appends it to the transparency log."""

    SCHEMES: ClassVar[tuple[str, ...]] = (ED25519,)
    ORDER = 100

    def on_end(self, run: TrialRun, final: dict[str, Any]) -> None:
        from shiftbench.attest.record import attest_trial  # cryptography is imported only when a trial attests

        final["attestation"] = attest_trial(run.dir, final["record"], self.SCHEMES)


@CALLBACKS.register("attest_slhdsa")
class AttestSLHDSA(Attest):
    """Signs with SLH-DSA-SHA2-128f (FIPS 205) only."""

    SCHEMES = (SLH_DSA,)


@CALLBACKS.register("attest_hybrid")
class AttestHybrid(Attest):
    """Signs with Ed25519 and SLH-DSA-SHA2-128f; verification requires both."""

    SCHEMES = (ED25519, SLH_DSA)

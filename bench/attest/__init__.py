"""Attested results: each finished trial gets a signed in-toto Statement binding its numbers to its data, code,
weights and per-example predictions (committed in an RFC 6962 Merkle tree), logged in an append-only transparency
log; ``shiftbench verify`` checks all of it offline. See :mod:`.record` for what a trial folder gains."""

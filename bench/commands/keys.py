"""``shiftbench keys create|list|export``: signing identities (a name or e-mail bound to keys) and fingerprints.

A keys folder holds one identity (default ``<config>/keys``; ``--dir`` for another, e.g. a host's or a witness's).
A fingerprint is a key's id: the hex sha256 of its DER SubjectPublicKeyInfo; trust policies list them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("keys", help="create, list and export signing identities and their fingerprints",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="keys_command", required=True)
    c = sub.add_parser("create", help="create an identity's keys (or add schemes to it)")
    c.add_argument("--identity", required=True, help="a name or e-mail, e.g. alice@example.org")
    c.add_argument("--scheme", action="append", default=None,
                   help="ed25519 (default), slh-dsa-sha2-128f or slh-dsa-sha2-128s; repeat for several")
    for q in (c, sub.add_parser("list", help="the identity and its keys' fingerprints"),
              sub.add_parser("export", help="the public keys as one PEM file (stdout or --out)")):
        q.add_argument("--dir", type=Path, default=None, help="keys folder (default <config>/keys)")
    sub.choices["export"].add_argument("--out", type=Path, default=None,
                                       help="write the PEM file here (default: print it on stdout)")
    p.set_defaults(func=run)


def run(a) -> int:
    from ..attest import keys as identities
    from ..attest.dsse import ED25519, keys_dir

    d = a.dir or keys_dir()
    if a.keys_command == "create":
        ident = identities.create(a.identity, a.scheme or [ED25519], d)
        print(f"identity {ident.name} in {d}")
        for k in ident.keys:
            print(f"  {k.scheme:18s} {k.keyid}")
        return 0
    if a.keys_command == "list":
        keys = identities.public_keys(d)
        if not keys:
            print(f"no keys in {d}; create them with: shiftbench keys create --identity NAME", file=sys.stderr)
            return 0
        print(f"identity {identities.identity_name(d)} in {d}")
        for k in keys:
            print(f"  {k.scheme:18s} {k.keyid}")
        return 0
    pem = identities.export_pem(d)
    if a.out is not None:
        a.out.write_text(pem)
        print(f"wrote {a.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem)
    return 0

"""The report's attestation section: each log's checkpoint, each row's attestation digest, and per leaderboard row
(dataset, method) how many trials are self-attested, host-verified (a countersigned SLSA verification summary that
verifies and names the trial's envelope, see :mod:`.vsa`) or failed by a host.

It reads the trial folders and the logs only (no signature checks: that is ``shiftbench verify``), and says which
trials carry no attestation, which are not in their log, and which logged runs the report does not show.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

from ..report import Section, html_table, md_table, report_section
from .log import TransparencyLog, log_dir_for
from . import vsa
from .record import ENVELOPE, RECEIPT


def _head(log: TransparencyLog) -> dict[str, Any] | None:
    heads = log.checkpoints()
    if not heads:
        return None
    cp = log.latest_checkpoint()
    if cp is None:
        return {"tree_size": None, "root_hash": "unreadable", "origin": None, "signers": []}
    return {"tree_size": cp.size, "root_hash": cp.root.hex(), "origin": cp.origin,
            "signers": [name for name, _ in cp.signatures]}


@report_section("attestation")
def attestation_section(trials: Sequence[dict]) -> Section | None:
    """Tree heads and per-trial attestation digests; None when no trial was attested."""
    rows, logs = [], {}
    for t in trials:
        digest = (t.get("final") or {}).get("attestation")
        d = Path(t["dir"])
        if not digest and not (d / ENVELOPE).exists():
            continue
        ld = log_dir_for(d)
        logs.setdefault(ld, TransparencyLog(ld))
        try:
            index = json.loads((d / RECEIPT).read_text(encoding="utf-8"))["log_index"]
        except (OSError, ValueError, KeyError):
            index = None
        spec = t.get("spec") or {}
        summary = vsa.read(d)
        rows.append({"trial": t["hash"][:16], "method": spec.get("method"), "dataset": spec.get("dataset"),
                     "test_envs": spec.get("test_envs"), "seed": spec.get("seed"),
                     "hparams_seed": spec.get("hparams_seed"), "attestation_sha256": digest, "log_index": index,
                     "status": summary["status"], "host": summary["host"]})
    if not rows:
        return None
    shown = {t["hash"] for t in trials}
    heads, notes = {}, []
    for ld, log in logs.items():
        heads[str(ld)] = _head(log)
        logged = set()
        for line in log.entries():
            try:
                logged.add(json.loads(line)["trial_hash"])
            except (ValueError, KeyError, TypeError):
                notes.append(f"log {ld.name} holds an unreadable entry")
        if logged - shown:
            notes.append(f"{len(logged - shown)} run(s) in log {ld} are not in this report")
    unattested = sum(1 for t in trials if not (t.get("final") or {}).get("attestation"))
    if unattested:
        notes.append(f"{unattested} trial(s) in this report carry no attestation")
    notes += [f"trial {r['trial']} is not in its log" for r in rows if r["log_index"] is None]

    trust: dict[tuple, dict[str, int]] = {}
    for r in rows:
        c = trust.setdefault((r["dataset"], r["method"]), {vsa.SELF: 0, vsa.HOST: 0, vsa.FAILED_ROW: 0})
        c[r["status"]] += 1
    trust_rows = [[ds, m, c[vsa.SELF], c[vsa.HOST], c[vsa.FAILED_ROW]] for (ds, m), c in sorted(trust.items(),
                                                                                               key=str)]
    md = ["Checkpoints (`shiftbench verify RUNS` checks signatures, digests, the data, metrics and log proofs):", ""]
    for ld, h in heads.items():
        if h is None:
            md.append(f"- `{ld}`: no checkpoint")
        else:
            md.append(f"- `{ld}`: {h['origin']}, size {h['tree_size']}, root `{h['root_hash']}`, "
                      f"signed by {', '.join(h['signers'])}")
    md += ["", "Trust per leaderboard row (host-verified: countersigned by a host that re-ran examples; whether to "
           "trust that host is yours to decide):", "",
           md_table(["dataset", "method", "self-attested", "host-verified", "failed"],
                    [[str(x) for x in row] for row in trust_rows])]
    md += [""] + [f"- **{n}**" for n in notes] + ([""] if notes else [])
    cols = ("trial", "method", "dataset", "test_envs", "hparams_seed", "seed", "log_index", "status",
            "attestation_sha256")
    md.append(md_table(["trial", "method", "dataset", "test envs", "draw", "seed", "log index", "status",
                        "attestation sha256"],
                       [[str(r[c]) for c in cols[:-1]] + [f"`{r['attestation_sha256']}`"] for r in rows]))
    e = html.escape
    body = "".join(f"<li><code>{e(ld)}</code>: size {e(str(h and h['tree_size']))}, root <code>"
                   f"{e(str(h and h['root_hash']))}</code></li>" for ld, h in heads.items())
    body = f"<ul>{body}</ul>" + "".join(f"<p class=\"note\"><b>{e(n)}</b></p>" for n in notes)
    body += html_table(["dataset", "method", "self-attested", "host-verified", "failed"], trust_rows)
    body += html_table(cols, [[r[c] for c in cols] for r in rows])
    return Section("attestation", "Attestations", "\n".join(md), body, terminal=_terminal_line(rows, heads, notes),
                   numbers=_numbers(rows, heads, notes),
                   metrics={"tree_heads": heads, "trials": rows, "notes": notes,
                            "trust": [dict(zip(("dataset", "method", vsa.SELF, vsa.HOST, vsa.FAILED_ROW), row))
                                      for row in trust_rows]})


def _terminal_line(rows: Sequence[dict], heads: dict[str, Any], notes: Sequence[str]) -> str:
    """The section in one line for the terminal: the full table goes to the report files only."""
    n_host = sum(r["status"] == vsa.HOST for r in rows)
    n_failed = sum(r["status"] == vsa.FAILED_ROW for r in rows)
    trust = f" ({n_host} host-verified, {n_failed} failed by a host)" if n_host or n_failed else ""
    roots = [f"{h['root_hash'][:16]}… (size {h['tree_size']})" for h in heads.values() if h]
    where = (f"log root {roots[0]}" if len(roots) == 1 else f"{len(heads)} logs, roots {', '.join(roots)}"
             if roots else "no checkpoint")
    warn = f"; {len(notes)} warning(s), first: {notes[0]}" if notes else ""
    return f"attestation: {len(rows)} trial(s) signed{trust}, {where}{warn}"


def _numbers(rows: Sequence[dict], heads: dict[str, Any], notes: Sequence[str]) -> dict[str, Any]:
    """metrics.json's entry: counts only (tree heads are keyed by their folder's path in report.json, which
    differs between clones)."""
    return {"signed": len(rows), "host_verified": sum(r["status"] == vsa.HOST for r in rows),
            "host_failed": sum(r["status"] == vsa.FAILED_ROW for r in rows),
            "not_in_log": sum(r["log_index"] is None for r in rows), "logs": len(heads),
            "tree_size": sum(int(h["tree_size"] or 0) for h in heads.values() if h), "warnings": len(notes)}

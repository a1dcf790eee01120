"""The report's attestation section: each log's checkpoint, each row's attestation digest, and per leaderboard row
(dataset, method) how many trials are self-attested, host-verified (a countersigned SLSA verification summary that
verifies and names the trial's envelope, see :mod:`.vsa`) or failed by a host, and, once some trial carries an
accuracy proof, how many are proof-verified: every ``proof_*.stark`` of the trial verifies and so does the host's
signed Statement about it (:func:`.proofs.check`, which verifies the zk-STARK itself, in milliseconds).

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
from . import proofs, vsa
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


@report_section("attestation", order=50)
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
                     "status": summary["status"], "host": summary["host"], "proofs": proofs.check_trial(d)})
    if not rows:
        return None
    proven = any(r["proofs"] for r in rows)
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
    notes += [f"trial {r['trial']}: {line}" for r in rows for p in r["proofs"] for line in p["failures"]]
    notes += [f"trial {r['trial']}: proof_{p['split']}.stark carries no signed Statement" for r in rows
              for p in r["proofs"] if p["status"] == proofs.UNSIGNED]

    trust: dict[tuple, dict[str, int]] = {}
    for r in rows:
        c = trust.setdefault((r["dataset"], r["method"]), {vsa.SELF: 0, vsa.HOST: 0, vsa.FAILED_ROW: 0,
                                                           proofs.VERIFIED: 0})
        c[r["status"]] += 1
        c[proofs.VERIFIED] += _proof_verified(r)
    # the proof column appears only once a trial carries a proof, so reports of sweeps without proofs are unchanged
    header = ["dataset", "method", vsa.SELF, vsa.HOST, vsa.FAILED_ROW] + ([proofs.VERIFIED] if proven else [])
    trust_rows = [[ds, m] + [c[k] for k in header[2:]] for (ds, m), c in sorted(trust.items(), key=str)]
    md = ["Checkpoints (`shiftbench verify RUNS` checks signatures, digests, the data, metrics and log proofs):", ""]
    for ld, h in heads.items():
        if h is None:
            md.append(f"- `{ld}`: no checkpoint")
        else:
            md.append(f"- `{ld}`: {h['origin']}, size {h['tree_size']}, root `{h['root_hash']}`, "
                      f"signed by {', '.join(h['signers'])}")
    md += ["", "Trust per leaderboard row (host-verified: countersigned by a host that re-ran examples; "
           + ("proof-verified: every accuracy proof and its signed Statement verify (`shiftbench verify --proof`); "
              if proven else "") + "whether to trust that host is yours to decide):", "",
           md_table(header, [[str(x) for x in row] for row in trust_rows])]
    if proven:
        md += ["", md_table(["trial", "split", "proof", "correct / n", "label root", "prover"],
                            _proof_rows(rows))]
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
    body += html_table(header, trust_rows)
    if proven:
        body += html_table(["trial", "split", "proof", "correct / n", "label root", "prover"], _proof_rows(rows))
    body += html_table(cols, [[r[c] for c in cols] for r in rows])
    numbers = _numbers(rows, heads, notes)
    if proven:
        numbers["proof_verified"] = sum(_proof_verified(r) for r in rows)
        numbers["proof_failed"] = sum(any(p["status"] == proofs.FAILED for p in r["proofs"]) for r in rows)
    table = [dict(r, proofs=[_proof_json(p) for p in r["proofs"]]) if proven else
             {k: v for k, v in r.items() if k != "proofs"} for r in rows]
    terminal = _terminal_line(rows, heads, notes)
    if proven:
        terminal += f" | {numbers['proof_verified']} of {len(rows)} proof-verified"
    return Section("attestation", "Attestations", "\n".join(md), body, terminal=terminal, numbers=numbers,
                   metrics={"tree_heads": heads, "trials": table, "notes": notes,
                            "trust": [dict(zip(header, row)) for row in trust_rows]})


def _proof_verified(row: dict) -> int:
    """1 when the trial carries proofs and every one, with its signed Statement, verifies."""
    return int(bool(row["proofs"]) and all(p["status"] == proofs.VERIFIED for p in row["proofs"]))


def _proof_rows(rows: Sequence[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        for p in r["proofs"]:
            st = p["statement"]
            out.append([r["trial"], p["split"], p["status"], f"{st.correct} / {st.n}" if st else "-",
                        st.label_root.hex()[:16] if st else "-", str(p["host"])])
    return out


def _proof_json(p: dict) -> dict:
    st = p["statement"]
    return {"split": p["split"], "status": p["status"], "host": p["host"], "correct": st and st.correct,
            "n": st and st.n, "label_root": st and st.label_root.hex(), "pred_root": st and st.pred_root.hex()}


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

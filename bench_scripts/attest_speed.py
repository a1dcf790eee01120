"""Cost of attested results: sign/verify times per scheme, envelope sizes, overhead per trial, verifying 1M predictions.

1. A quickstart trial (the suite's first: its dataset, method, 600 steps) runs without callbacks; then the attestation
   its ``attest`` callback performs (manifest, metrics, Merkle commitment, statement, signature, log append) is timed
   on that folder for each scheme, as a fraction of the trial's wall time (goal: under 2% with Ed25519).
2. Sign and verify times of a trial's statement per scheme, and the envelope sizes.
3. A trial folder whose predictions.npz holds 1,000,000 rows is attested and then verified in full
   (signatures, digests, Merkle root, metrics from the predictions, log proofs, the ids checked against the rebuilt
   dataset; goal: under 10 s on 2 cores). Its random rows are not the dataset's examples, so the data checks fail by
   design (one line per split); their cost, the id comparison over every row, is part of the time.

Keys and logs go to a temporary folder; your own keys are not touched. Figures depend on the machine and its load:
each is the median (and minimum) of several repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def synthetic_trial(source: Path, dest: Path, n: int, seed: int = 0) -> dict:
    """A copy of ``source`` whose predictions are ``n`` random rows over its splits, with matching records."""
    shutil.copytree(source, dest)
    for name in ("attestation.dsse.json", "attestation.log.json", "metrics.json", "data_manifest.json"):
        (dest / name).unlink(missing_ok=True)
    meta = json.loads((dest / "spec.json").read_text())
    names = sorted(meta["dataset"]["sizes"])
    rng = np.random.default_rng(seed)
    per = n // len(names)
    n = per * len(names)
    label = rng.integers(0, 2, n)
    pred = np.where(rng.random(n) < 0.8, label, 1 - label)
    arrays = {"split": np.repeat(np.array(names), per), "idx": np.tile(np.arange(per), len(names)), "label": label,
              "pred": pred, "score": rng.uniform(0.5, 1, n).astype(np.float32),
              "correct": (pred == label).astype(np.float32), "loss": rng.exponential(0.5, n).astype(np.float32)}
    with open(dest / "predictions.npz", "wb") as f:
        np.savez(f, **arrays)
    final = json.loads((dest / "final.json").read_text())
    record = dict(final["record"])
    for i, name in enumerate(names):
        rows = slice(i * per, (i + 1) * per)
        record[f"{name}_acc"] = float(np.mean(arrays["correct"][rows]))
        record[f"{name}_loss"] = float(np.mean(arrays["loss"][rows]))
    meta["dataset"]["sizes"] = {name: per for name in names}
    (dest / "spec.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    lines = (dest / "results.jsonl").read_text().splitlines()
    (dest / "results.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(record, sort_keys=True)]) + "\n")
    final["record"] = record
    return final


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=None, help="override the quickstart's 600 steps (quick runs)")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="attest_speed_"))
    os.environ["SHIFTBENCH_HOME"] = str(tmp / "home")

    from shiftbench.attest import dsse
    from shiftbench.attest.record import ENVELOPE, attest_trial, canonical_bytes
    from shiftbench.attest.statement import PAYLOAD_TYPE
    from shiftbench.attest.verify import verify_trial
    from shiftbench.config import load_suite
    from shiftbench.trainer import run_trial

    spec = load_suite("quickstart").trials()[0]
    spec = dataclasses.replace(spec, callbacks=(), steps=a.steps or spec.steps)
    print(f"quickstart trial: {spec.method} on {spec.dataset}, {spec.steps} steps, torch threads "
          f"{__import__('torch').get_num_threads()}")
    trial = tmp / "sweep" / "trials" / spec.short_hash
    final = run_trial(spec, trial)
    wall = final["wall_time"]
    print(f"trial wall time (no attestation): {wall:.2f} s")

    schemes = {"ed25519": ("ed25519",), "slh-dsa-sha2-128s": ("slh-dsa-sha2-128s",),
               "slh-dsa-sha2-128f": ("slh-dsa-sha2-128f",), "hybrid (ed25519 + 128f)": ("ed25519", "slh-dsa-sha2-128f"),
               "hybrid (ed25519 + 128s)": ("ed25519", "slh-dsa-sha2-128s")}
    for s in {x for v in schemes.values() for x in v}:
        dsse.load_signing_key(s)  # key generation is a one-off, not part of a trial's cost
    print("\nattestation of that trial (the callback's whole on_end), per scheme:")
    for label, sch in schemes.items():
        med, best = timed(lambda: attest_trial(trial, final["record"], sch, log_dir=tmp / f"log-{len(sch)}"),
                          a.repeats)
        size = (trial / ENVELOPE).stat().st_size
        print(f"  {label:26s} {med * 1000:8.1f} ms (min {best * 1000:.1f})  = {100 * med / wall:.2f}% of the trial;"
              f"  envelope {size:,} bytes")

    statement = json.loads(dsse.b64decode_strict(json.loads((trial / ENVELOPE).read_text())["payload"]))
    payload = canonical_bytes(statement)
    print(f"\nsign / verify one statement ({len(payload):,}-byte payload), per scheme:")
    for s in ("ed25519", "slh-dsa-sha2-128s", "slh-dsa-sha2-128f"):
        key = dsse.load_signing_key(s)
        env = dsse.sign_envelope(PAYLOAD_TYPE, payload, [key])
        sig_len = len(dsse.b64decode_strict(env["signatures"][0]["sig"]))
        ts = timed(lambda: dsse.sign_envelope(PAYLOAD_TYPE, payload, [key]), a.repeats)
        tv = timed(lambda: dsse.verify_envelope(env, [key.public], [key.keyid]), max(a.repeats, 20))
        print(f"  {s:18s} sign {ts[0] * 1000:8.2f} ms   verify {tv[0] * 1000:7.3f} ms   signature {sig_len:,} B   "
              f"envelope {len(dsse.envelope_bytes(env)):,} B")

    print(f"\n{a.rows:,} committed predictions:")
    big = tmp / "big" / "trials" / spec.short_hash
    big_final = synthetic_trial(trial, big, a.rows)
    t0 = time.perf_counter()
    big_final["attestation"] = attest_trial(big, big_final["record"])
    print(f"  attest (commit + sign + log): {time.perf_counter() - t0:.2f} s")
    (big / "final.json").write_text(json.dumps(big_final, indent=1, sort_keys=True))
    results = []
    med, best = timed(lambda: results.append(verify_trial(big)), 3)
    failures = results[-1].failures
    data = [f for f in failures if f.startswith("data:")]
    print(f"  verify in full: {med:.2f} s (min {best:.2f}); checks failed: {len(failures) - len(data)} "
          f"{[f for f in failures if f not in data][:2]} (+{len(data)} data checks: synthetic ids, by design)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

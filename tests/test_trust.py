"""A leaderboard row a stranger can trust (issue 14): each attack of a dishonest submitter who holds their own valid
key and their own log, produced the way that submitter would, with the exact outcome verify now gives; and the clean
path (an honest sweep under a policy; a host's countersignature shown in the report).

Every forgery is re-signed with the submitter's own key, so signatures and digests hold; where an assertion lists a
trial's failures, the list shows that only the new checks (data, policy, witness) catch it.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from shiftbench.attest import dsse
from shiftbench.attest import keys as identities
from shiftbench.attest.log import TransparencyLog
from shiftbench.attest.policy import load_policy
from shiftbench.attest.predictions import load_predictions
from shiftbench.attest.record import ENVELOPE, RECEIPT, attest_trial
from shiftbench.attest.verify import FAILED, NOT_CHECKED, OK, UNTRUSTED, Trust, verify_path
from shiftbench.attest.witness import WitnessState
from shiftbench.cli import main
from shiftbench.config import TrialSpec
from shiftbench.trainer import RunOptions, run_trial

ALICE = "alice@example.org"
HYBRID = ("ed25519", "slh-dsa-sha2-128f")
TINY = {"env_size": 120, "resolution": 8}


def _spec(seed: int, dataset: str = "colored_digits", options=TINY) -> TrialSpec:
    return TrialSpec.resolve(dataset, "erm", steps=4, eval_every=2, seed=seed, dataset_options=options,
                             callbacks=("attest_hybrid",))


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as m:
        m.setenv("SHIFTBENCH_HOME", str(h))
        m.delenv("SHIFTBENCH_LOG_KEYS", raising=False)
        identities.create(ALICE, HYBRID)  # the submitter's identity: <home>/keys
        yield h


@pytest.fixture(scope="module")
def honest(home, tmp_path_factory):
    """An honest sweep of two tiny trials signed by alice (Ed25519 + SLH-DSA), and a policy that trusts her."""
    out = tmp_path_factory.mktemp("sweeps") / "sweep"
    for seed in (0, 1):
        spec = _spec(seed)
        run_trial(spec, out / "trials" / spec.short_hash)
    keys = {k.scheme: k.keyid for k in identities.public_keys(home / "keys")}
    policy = home / "policy.yaml"
    policy.write_text(f"identities:\n  - identity: {ALICE}\n    keys: [{keys['ed25519']}, "
                      f"{keys['slh-dsa-sha2-128f']}]\nrequire_schemes: [ed25519, slh-dsa-sha2-128f]\n")
    return out


@pytest.fixture
def sweep(honest, tmp_path):
    """A copy of the honest sweep for one attack (its folder keeps the name, so its log keeps its origin)."""
    work = tmp_path / "copy" / honest.name
    shutil.copytree(honest, work)
    return work


@pytest.fixture
def policy(home):
    return str(home / "policy.yaml")


def _trials(sweep: Path) -> list[Path]:
    return sorted((sweep / "trials").iterdir())


def _verify(target: Path, policy: str, state: Path, **kw):
    return verify_path(target, Trust.of(policy=load_policy(policy)), state=WitnessState(state), **kw)


def forge(trial: Path, edit, schemes=HYBRID, keys_dir=None) -> None:
    """What a submitter does: edit the predictions, make every record agree with them, and re-sign with their own
    valid key (attest_trial appends to their own log)."""
    arrays = load_predictions(trial / "predictions.npz")
    edit(arrays)
    with open(trial / "predictions.npz", "wb") as f:
        np.savez(f, **arrays)
    final = json.loads((trial / "final.json").read_text())
    record = dict(final["record"])
    split = arrays["split"].astype(str)
    for name in np.unique(split):
        rows = split == name
        record[f"{name}_acc"] = float(np.mean(arrays["correct"][rows]))
        record[f"{name}_loss"] = float(np.mean(arrays["loss"][rows]))
    meta = json.loads((trial / "spec.json").read_text())
    meta["dataset"]["sizes"] = {str(n): int(np.sum(split == n)) for n in np.unique(split)}  # the manifest agrees
    (trial / "spec.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
    lines = (trial / "results.jsonl").read_text().splitlines()
    (trial / "results.jsonl").write_text("\n".join(lines[:-1] + [json.dumps(record, sort_keys=True)]) + "\n")
    final["record"] = record
    final["attestation"] = attest_trial(trial, record, schemes, keys_dir=keys_dir)
    (trial / "final.json").write_text(json.dumps(final, indent=1, sort_keys=True))


def _test_rows(arrays, split="env2_in"):
    rows = np.flatnonzero(arrays["split"].astype(str) == split)
    wrong = rows[arrays["correct"][rows] == 0]
    right = rows[arrays["correct"][rows] == 1]
    assert len(wrong) and len(right)
    return wrong, right


def _copy_rows(a):
    wrong, right = _test_rows(a)
    for k in a:
        if k != "split":
            a[k][wrong] = a[k][right[0]]  # every wrong row becomes a copy of one correct row (same id)


def _drop_rows(a):
    wrong, _ = _test_rows(a)
    keep = np.setdiff1d(np.arange(len(a["idx"])), wrong)
    for k in list(a):
        a[k] = a[k][keep]


def _choose_labels(a):
    a["label"] = a["pred"].copy()
    a["correct"] = np.ones_like(a["correct"])
    a["loss"] = -np.log(a["score"]).astype(np.float32)  # a careful forger keeps the losses plausible too


# ------------------------------------------------------------------------------------------- what the data decides


def test_the_honest_sweep_verifies_ok_under_the_policy(sweep, policy, tmp_path, capsys):
    results, problems = _verify(sweep, policy, tmp_path / "s.json", reexecute=40, seed=0)
    assert [r.outcome for r in results] == [OK, OK] and problems == []
    assert all(r.trust_note == f"trusted: {ALICE} in policy {Path(policy).resolve()}" for r in results)
    assert all(r.reexecuted == 40 and "ids, labels and metrics against the rebuilt dataset" in r.checks
               for r in results)
    assert main(["verify", str(sweep), "--trust", policy, "--state", str(tmp_path / "s2.json")]) == 0
    out = capsys.readouterr().out
    assert out.count(f"OK: signed by {ALICE} (ed25519 ") == 2 and "slh-dsa-sha2-128f" in out


@pytest.mark.parametrize("attack, edit, failure", [
    ("copied rows", _copy_rows, "data: env2_in has 96 rows but {distinct} distinct example ids (rows are repeated)"),
    ("dropped rows", _drop_rows, "data: env2_in commits {distinct} distinct ids, the dataset has 96: {missing} of "
                                 "the dataset's are missing, 0 are not in it"),
    ("chosen labels", _choose_labels, "data: env2_in: {n_wrong} committed labels differ from the dataset's labels"),
])
def test_forged_rows_resigned_with_the_submitters_key_fail_against_the_rebuilt_dataset(sweep, policy, tmp_path, attack,
                                                                                        edit, failure, capsys):
    trial = _trials(sweep)[0]
    before = load_predictions(trial / "predictions.npz")
    wrong, _ = _test_rows(before)
    forge(trial, edit)
    after = load_predictions(trial / "predictions.npz")
    rows = after["split"].astype(str) == "env2_in"
    assert after["correct"][rows].mean() == 1.0  # the forgery: 100% on the test environment
    expected = failure.format(distinct=96 - len(wrong), missing=len(wrong), n_wrong=len(wrong))
    (res, _), problems = _verify(sweep, policy, tmp_path / "s.json")
    assert res.outcome == FAILED and expected in res.failures and problems == []
    assert all(f.startswith("data:") for f in res.failures)  # signatures, digests, log: all hold for the forger
    # the rebuilt dataset's labels give the honest accuracy back
    honest_acc = before["correct"][before["split"].astype(str) == "env2_in"].mean()
    assert f"the dataset's labels and the committed predictions give {honest_acc:.6g}" in \
        " ".join(res.failures) or attack != "chosen labels"
    assert main(["verify", str(trial), "--trust", policy, "--reexecute", "200", "--seed", "0", "--state",
                 str(tmp_path / "s2.json")]) == 1
    assert expected in capsys.readouterr().out


def test_reexecution_samples_the_rebuilt_dataset_so_dropped_rows_are_hit(sweep, policy, tmp_path):
    trial = _trials(sweep)[0]
    forge(trial, _drop_rows)
    (res,), _ = _verify(trial, policy, tmp_path / "s.json", reexecute=360, seed=0)  # every example of the dataset
    n_dropped = 360 - len(load_predictions(trial / "predictions.npz")["idx"])
    assert n_dropped > 0 and f"re-execution: {n_dropped} of 360 examples sampled from the dataset have no committed prediction" in \
        res.failures


def test_a_dataset_that_cannot_be_rebuilt_is_not_checked_against_data_never_ok(home, policy, tmp_path, capsys):
    import importlib.util

    spec_ = importlib.util.spec_from_file_location("tds", Path(__file__).parent / "test_datasets.py")
    tds = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(tds)
    root = tmp_path / "data"
    tds.write_fake_mnist(root, gz=False)
    spec = _spec(0, "colored_mnist", {})
    trial = tmp_path / "m" / "trials" / spec.short_hash
    run_trial(spec, trial, RunOptions(data_root=str(root)))
    (res,), _ = _verify(trial, policy, tmp_path / "s.json")
    assert res.outcome == NOT_CHECKED and res.failures == [] and res.not_checked.startswith(
        "dataset colored_mnist cannot be rebuilt here")
    assert main(["verify", str(trial), "--trust", policy, "--state", str(tmp_path / "s.json")]) == 4
    assert "NOT CHECKED AGAINST DATA: signed by alice@example.org" in capsys.readouterr().out
    assert main(["verify", str(trial), "--trust", policy, "--data-root", str(root), "--state",
                 str(tmp_path / "s.json")]) == 0


# ------------------------------------------------------------------------------------------- who signed


def test_any_key_a_valid_signature_by_an_unknown_key_is_untrusted(sweep, policy, tmp_path, capsys):
    mallory = tmp_path / "mallory"
    identities.create(ALICE, HYBRID, mallory)  # claims alice's name, holds its own keys
    trial = _trials(sweep)[0]
    forge(trial, lambda a: None, keys_dir=mallory)
    (res, _), _ = _verify(sweep, policy, tmp_path / "s.json")
    fp = identities.public_keys(mallory)[0].keyid
    assert res.outcome == UNTRUSTED and res.failures == []
    assert res.trust_note.startswith("signed by an unknown key (") and fp[:16] in res.trust_note
    assert main(["verify", str(trial), "--trust", policy, "--state", str(tmp_path / "s.json")]) == 3
    assert "UNTRUSTED: signed by alice@example.org" in capsys.readouterr().out
    # for one's own runs --public-key still works, and says so
    pem = tmp_path / "mallory.pem"
    assert main(["keys", "export", "--dir", str(mallory), "--out", str(pem)]) == 0
    assert main(["verify", str(trial), "--public-key", str(pem), "--state", str(tmp_path / "s.json")]) == 0
    assert "trusted: given with --public-key (your own runs; not a policy)" in capsys.readouterr().out


def test_hybrid_downgrade_the_policy_not_the_statement_decides_the_schemes(sweep, policy, tmp_path):
    trial = _trials(sweep)[0]
    forge(trial, lambda a: None, schemes=("ed25519",))  # alice's own Ed25519 key only; the statement lists one
    (res, _), _ = _verify(sweep, policy, tmp_path / "s.json")
    assert res.outcome == FAILED and res.failures == [
        f"policy requires a slh-dsa-sha2-128f signature by {ALICE}; the envelope has none (the statement cannot "
        "lower what the policy requires)"]


def test_a_policy_scoped_to_other_sweeps_does_not_trust_this_one(sweep, home, tmp_path):
    keyid = identities.public_keys(home / "keys")[0].keyid
    scoped = tmp_path / "scoped.json"
    scoped.write_text(json.dumps({"identities": [{"identity": ALICE, "keys": [keyid], "sweeps": ["leaderboard-*"]}]}))
    results, _ = _verify(sweep, str(scoped), tmp_path / "s.json")
    assert [r.outcome for r in results] == [UNTRUSTED, UNTRUSTED]
    assert "trusted by the policy for sweeps ['leaderboard-*'] only, not 'sweep'" in results[0].trust_note


def test_keys_create_list_export_print_fingerprints(tmp_path, capsys):
    d = tmp_path / "host"
    assert main(["keys", "create", "--identity", "host.example.org", "--dir", str(d)]) == 0
    key = dsse.read_public_keys(d / "ed25519.pub")[0]
    import hashlib

    assert key.keyid == hashlib.sha256(key.spki).hexdigest()
    assert f"ed25519            {key.keyid}" in capsys.readouterr().out
    assert main(["keys", "list", "--dir", str(d)]) == 0
    assert "identity host.example.org" in capsys.readouterr().out
    assert main(["keys", "export", "--dir", str(d)]) == 0
    pem = capsys.readouterr().out
    assert f"# fingerprint: {key.keyid}" in pem and "# identity: host.example.org" in pem
    assert main(["keys", "create", "--identity", "other", "--dir", str(d)]) == 2  # one identity per folder


# ------------------------------------------------------------------------------------------- the log


def _truncate(sweep: Path) -> None:
    """Drop the last entry, its checkpoint and its trial, and point `checkpoint` at the previous head."""
    log = sweep / "attestation_log"
    last = json.loads((log / "entries.jsonl").read_text().splitlines()[-1])
    shutil.rmtree(sweep / "trials" / last["trial"])
    for name in ("entries.jsonl", "tree_heads.jsonl"):
        (log / name).write_text("".join((log / name).read_text().splitlines(keepends=True)[:-1]))
    (log / "checkpoint").write_text(json.loads((log / "tree_heads.jsonl").read_text().splitlines()[-1]))


def _rewrite(sweep: Path) -> None:
    """Rewrite the first entry (a re-signed trial) and re-sign every checkpoint: the operator key is the
    submitter's own, so the rebuilt log is self-consistent."""
    shutil.rmtree(sweep / "attestation_log")
    for t in _trials(sweep):
        forge(t, lambda a: None)


def _fork(sweep: Path) -> None:
    """Keep the first entry and grow a different second one from it."""
    log = sweep / "attestation_log"
    second = json.loads((log / "entries.jsonl").read_text().splitlines()[1])["trial"]
    for name in ("entries.jsonl", "tree_heads.jsonl"):
        (log / name).write_text((log / name).read_text().splitlines(keepends=True)[0])
    forge(sweep / "trials" / second, lambda a: None)


def _recreate(sweep: Path) -> None:
    """Delete the whole log and the other trial; re-attest only the one kept (forged)."""
    shutil.rmtree(sweep / "attestation_log")
    shutil.rmtree(_trials(sweep)[1])
    forge(_trials(sweep)[0], _copy_rows)


LOG_ATTACKS = {
    "truncation": (_truncate, "has 1 entries, 2 when last seen: truncated or rolled back"),
    "rewritten entry": (_rewrite, "is not an extension of the checkpoint seen before (size 2)"),
    "fork": (_fork, "is not an extension of the checkpoint seen before (size 2)"),
    "deleted and recreated": (_recreate, "has 1 entries, 2 when last seen: truncated or rolled back"),
}


@pytest.mark.parametrize("mode", ["sweep", "trial"])
@pytest.mark.parametrize("attack", list(LOG_ATTACKS))
def test_log_attacks_by_its_own_operator_are_caught_on_the_second_verify(sweep, policy, tmp_path, attack, mode):
    state = tmp_path / "state.json"
    target = (lambda: sweep if mode == "sweep" else _trials(sweep)[0])
    first, problems = _verify(target(), policy, state)
    assert {r.outcome for r in first} == {OK} and problems == []
    mutate, expected = LOG_ATTACKS[attack]
    mutate(sweep)
    fresh, _ = _verify(target(), policy, tmp_path / "fresh.json")  # a verifier who never saw the log: fooled
    if attack != "deleted and recreated":
        assert {r.outcome for r in fresh} == {OK}, [r.failures for r in fresh]
    again, _ = _verify(target(), policy, state)
    assert again[0].outcome == FAILED
    assert any(f.startswith("log shiftbench.local/") and expected in f for f in again[0].failures), \
        again[0].failures


def test_a_replayed_older_envelope_of_a_lone_trial_is_caught(home, honest, policy, tmp_path):
    trial, log = tmp_path / "lone", tmp_path / "userlog"
    shutil.copytree(_trials(honest)[0], trial)
    final = json.loads((trial / "final.json").read_text())
    final["attestation"] = attest_trial(trial, final["record"], HYBRID, log_dir=log)
    (trial / "final.json").write_text(json.dumps(final))
    old = {n: (trial / n).read_bytes() for n in (ENVELOPE, RECEIPT, "final.json")}
    final["attestation"] = attest_trial(trial, final["record"], HYBRID, log_dir=log)  # the rerun
    (trial / "final.json").write_text(json.dumps(final))
    state = tmp_path / "state.json"
    (res,), _ = _verify(trial, policy, state, log_dir=log)
    assert res.outcome == OK
    for n, data in old.items():  # replay the older envelope, receipt and record
        (trial / n).write_bytes(data)
    (res,), _ = _verify(trial, policy, state, log_dir=log)
    assert res.failures == ["log: log entry 1 logs a newer envelope of this trial: this one (entry 0) was superseded"]
    for name in ("entries.jsonl", "tree_heads.jsonl"):  # ... and hide the newer entry
        (log / name).write_text((log / name).read_text().splitlines(keepends=True)[0])
    (res,), _ = _verify(trial, policy, state, log_dir=log)
    assert res.outcome == FAILED and any(f.endswith("has 1 entries, 2 when last seen: truncated or rolled back")
                                         for f in res.failures)


def test_a_witness_cosigns_only_consistent_checkpoints_and_a_policy_can_require_it(sweep, home, tmp_path, capsys):
    w = tmp_path / "witness"
    assert main(["keys", "create", "--identity", "witness.example.org", "--dir", str(w)]) == 0
    keys = {k.scheme: k.keyid for k in identities.public_keys(home / "keys")}
    pol = tmp_path / "witnessed.yaml"
    pol.write_text(f"identities:\n  - identity: {ALICE}\n    keys: [{keys['ed25519']}]\n"
                   f"witnesses:\n  - identity: witness.example.org\n    keys: [{w / 'ed25519.pub'}]\n")
    results, _ = _verify(sweep, str(pol), tmp_path / "v.json")
    assert [r.outcome for r in results] == [FAILED, FAILED]
    assert "cosigned by 0 of the policy's witnesses, it requires 1" in results[0].failures[0]
    capsys.readouterr()
    wstate = str(tmp_path / "w.json")
    assert main(["log", "witness", str(sweep), "--key", str(w), "--state", wstate]) == 0
    note = capsys.readouterr().out
    assert note.splitlines()[1] == "2" and note.count("\u2014 ") == 2  # operator's signature + the cosignature
    results, _ = _verify(sweep, str(pol), tmp_path / "v2.json")
    assert [r.outcome for r in results] == [OK, OK]
    _truncate(sweep)
    assert main(["log", "witness", str(sweep), "--key", str(w), "--state", wstate]) == 1
    assert "truncated or rolled back" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------- DSSE, the host


def test_dsse_both_base64_alphabets_and_independent_implementations(honest):
    trial = _trials(honest)[0]
    env = json.loads((trial / ENVELOPE).read_text())
    payload = base64.b64decode(env["payload"])
    signers = json.loads(payload)["predicate"]["signers"]
    keys = [dsse.PublicKey.from_spki(base64.b64decode("".join(s["public_key"].splitlines()[1:-1]))) for s in signers]

    def url(text, pad):
        t = text.replace("+", "-").replace("/", "_")
        return t if pad else t.rstrip("=")

    for pad in (True, False):
        copy = dict(env, payload=url(env["payload"], pad),
                    signatures=[dict(s, sig=url(s["sig"], pad)) for s in env["signatures"]])
        assert dsse.verify_envelope(copy, keys, [k.keyid for k in keys]) == (payload, [])
    # securesystemslib verifies the Ed25519 signature (key id = hex sha256 of the DER SubjectPublicKeyInfo) ...
    from securesystemslib.dsse import Envelope
    from securesystemslib.signer import SSlibKey

    ed = next(k for k in keys if k.scheme == "ed25519")
    sslib = SSlibKey(ed.keyid, "ed25519", "ed25519", {"public": ed.raw.hex()})
    e = Envelope.from_dict({**env, "signatures": [s for s in env["signatures"] if s["keyid"] == ed.keyid]})
    assert list(e.verify([sslib], 1)) == [ed.keyid]
    # ... and in_toto_attestation parses the Statement
    from google.protobuf import json_format
    from in_toto_attestation.v1.statement import Statement

    st = Statement(subjects=[], predicate_type="x", predicate={})
    json_format.Parse(payload, st.pb)
    st.validate()
    assert st.pb.predicate_type == "urn:shiftbench:trial-result:v1" and len(st.pb.subject) == 6


def test_a_host_countersigns_and_the_report_counts_host_verified_rows(sweep, policy, tmp_path):
    host = tmp_path / "host"
    assert main(["keys", "create", "--identity", "leaderboard.example.org", "--dir", str(host)]) == 0
    a, b = _trials(sweep)
    forge(b, _copy_rows)  # one honest trial, one forged
    assert main(["verify", str(sweep), "--trust", policy, "--reexecute", "20", "--seed", "0", "--countersign",
                 str(host), "--state", str(tmp_path / "s.json")]) == 1
    summaries = {t: json.loads(base64.b64decode(json.loads((t / "verification.dsse.json").read_text())["payload"]))
                 for t in (a, b)}
    va, vb = summaries[a]["predicate"], summaries[b]["predicate"]
    assert summaries[a]["predicateType"] == "https://slsa.dev/verification_summary/v1"
    assert va["verificationResult"] == "PASSED" and vb["verificationResult"] == "FAILED"
    assert va["verifier"]["id"] == "urn:shiftbench:verifier:leaderboard.example.org"
    assert va["verifiedLevels"] == ["SHIFTBENCH_SIGNED", "SHIFTBENCH_DATA_CHECKED", "SHIFTBENCH_REEXECUTED"]
    assert va["shiftbench"]["reexecuted"] == 20 and va["shiftbench"]["submitter"]["identity"] == ALICE
    assert va["inputAttestations"][0]["digest"]["sha256"] == json.loads((a / "final.json").read_text())["attestation"]
    assert va["policy"]["uri"] == str(Path(policy).resolve())
    from shiftbench.report import build_report

    metrics, text = build_report(sweep, tmp_path / "rep", plots=False)
    assert metrics["sections"]["attestation"]["trust"] == [
        {"dataset": "colored_digits", "method": "erm", "self-attested": 0, "host-verified": 1, "failed": 1}]
    # a trial re-signed after the host's summary is self-attested again: the summary names another envelope
    forge(a, lambda x: None)
    metrics, _ = build_report(sweep, tmp_path / "rep2", plots=False)
    assert metrics["sections"]["attestation"]["trust"][0]["self-attested"] == 1


@pytest.mark.slow
def test_mlflow_runs_carry_the_signer_and_after_countersigning_the_hosts_outcome(sweep, policy, tmp_path):
    from shiftbench.tracking import Tracker

    host = tmp_path / "host"
    identities.create("leaderboard.example.org", ("ed25519",), host)
    trial = _trials(sweep)[0]
    tracker = Tracker(sweep, "t")
    run_id = tracker.mirror_trial(trial)
    tags = tracker.client.get_run(run_id).data.tags
    assert tags["shiftbench.signer_identity"] == ALICE and "shiftbench.verification" not in tags
    assert main(["verify", str(trial), "--trust", policy, "--reexecute", "10", "--seed", "0", "--countersign",
                 str(host), "--runs", str(sweep), "--state", str(tmp_path / "s.json")]) == 0
    tags = tracker.client.get_run(run_id).data.tags
    assert tags["shiftbench.verification"] == "PASSED" and tags["shiftbench.verifier"] == "leaderboard.example.org"
    names = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert {"attestation.dsse.json", "verification.dsse.json"} <= names

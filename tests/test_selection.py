"""Model-selection rules on hand-written records (3 environments, test environment 2 unless said otherwise).

Expected picks are worked out by hand in the comments next to the fixtures.
"""

from __future__ import annotations

import dataclasses

import pytest

from shiftbench import selection as sel
from shiftbench.selection import RULES, Selection, leave_one_domain_out, oracle, selection_rule, training_domain


def rec(step: int, out: tuple[float, float, float], in_: tuple[float, float, float]) -> dict:
    """A DomainBed-style record for 3 environments."""
    r: dict = {"step": step, "loss": 0.5}
    for i in range(3):
        r[f"env{i}_in_acc"] = in_[i]
        r[f"env{i}_out_acc"] = out[i]
    return r


def trial(h: str, hp: int, test_envs: list[int], records: list[dict], seed: int = 0) -> dict:
    spec = {"dataset": "toy", "method": "erm", "seed": seed, "hparams_seed": hp, "test_envs": test_envs}
    return {"hash": h, "spec": spec, "records": records}


# Draw 0, holds out env 2. Training-domain val = mean(out0, out1): step 0: .55, step 10: .70, step 20: .65
# -> best step 10 (test in2 = .42). Oracle: last step 20, val out2 = .35, test in2 = .45.
A = trial("a", 0, [2], [
    rec(0, (0.50, 0.60, 0.10), (0.9, 0.9, 0.20)),
    rec(10, (0.70, 0.70, 0.30), (0.9, 0.9, 0.42)),
    rec(20, (0.65, 0.65, 0.35), (0.9, 0.9, 0.45)),
])
# Draw 1, holds out env 2. Training-domain val: step 0: .60, step 10: .71, step 20: .75 -> step 20 (test .33).
# Oracle: last step 20, val .30 (< A's .35); its best out2 (.60 at step 10) would win if the oracle early-stopped.
B = trial("b", 1, [2], [
    rec(0, (0.60, 0.60, 0.50), (0.9, 0.9, 0.55)),
    rec(10, (0.70, 0.72, 0.60), (0.9, 0.9, 0.62)),
    rec(20, (0.75, 0.75, 0.30), (0.9, 0.9, 0.33)),
])
# Trials that single-env rules must ignore for test env 2: a leave-one-out pair and another test env.
NOISE = [
    trial("p-noise", 5, [2, 0], [rec(20, (0.99, 0.99, 0.99), (0.99, 0.99, 0.99))], seed=0),
    trial("t1", 0, [1], [rec(10, (0.80, 0.10, 0.90), (0.8, 0.77, 0.9)), rec(20, (0.70, 0.20, 0.60), (0.8, 0.66, 0.9))]),
]


def pair(h: str, hp: int, j: int, in_j: dict[int, float], order: str = "tj") -> dict:
    """A trial holding out (2, j); only env j's in-accuracy matters for leave-one-domain-out."""
    recs = []
    for step, acc in in_j.items():
        ins = [0.1, 0.1, 0.1]
        ins[j] = acc
        recs.append(rec(step, (0.99, 0.99, 0.99), tuple(ins)))  # type: ignore[arg-type]
    return trial(h, hp, [2, j] if order == "tj" else [j, 2], recs)


# Leave-one-domain-out, test env 2, val = mean over j in {0, 1} of pair (2, j)'s env{j}_in_acc:
#   draw 0: step 0: (.50+.40)/2 = .45, step 10: (.60+.80)/2 = .70, step 20: (.70+.60)/2 = .65 -> step 10, A's in2 = .42
#   draw 1: step 0: (.55+.50)/2 = .525, step 10: (.65+.70)/2 = .675, step 20: (.66+.70)/2 = .68 -> step 20, B's .33
#   best draw: 0 (.70 > .68) -> hash "a", step 10, test .42.
P0_0 = pair("p00", 0, 0, {0: 0.50, 10: 0.60, 20: 0.70})
P0_1 = pair("p01", 0, 1, {0: 0.40, 10: 0.80, 20: 0.60}, order="jt")
P1_0 = pair("p10", 1, 0, {0: 0.55, 10: 0.65, 20: 0.66})
P1_1 = pair("p11", 1, 1, {0: 0.50, 10: 0.70, 20: 0.70})
ALL = [B, P1_1, A, P0_0, *NOISE, P1_0, P0_1]


def test_training_domain_picks_best_checkpoint_then_best_draw():
    s = training_domain(ALL, 2)
    assert s == Selection(val_acc=pytest.approx(0.75), test_acc=pytest.approx(0.33), hash="b", hparams_seed=1, step=20)


def test_oracle_uses_last_step_and_picks_a_different_trial():
    s = oracle(ALL, 2)
    assert (s.hash, s.hparams_seed, s.step) == ("a", 0, 20)
    assert s.val_acc == pytest.approx(0.35) and s.test_acc == pytest.approx(0.45)
    assert s.hash != training_domain(ALL, 2).hash


def test_oracle_without_the_winning_trial_takes_last_not_best_step():
    s = oracle([B], 2)
    assert s.step == 20 and s.val_acc == pytest.approx(0.30) and s.test_acc == pytest.approx(0.33)


def test_single_env_rules_for_another_test_env():
    # Only trial t1 holds out env 1. Training-domain val = mean(out0, out2): step 10: .85, step 20: .65 -> step 10.
    s = training_domain(ALL, 1)
    assert (s.hash, s.step) == ("t1", 10) and s.test_acc == pytest.approx(0.77) and s.val_acc == pytest.approx(0.85)
    o = oracle(ALL, 1)
    assert (o.hash, o.step) == ("t1", 20) and o.test_acc == pytest.approx(0.66) and o.val_acc == pytest.approx(0.20)


def test_no_single_env_trial_gives_none():
    # Env 0 is only held out inside a pair: nothing to select.
    assert training_domain(ALL, 0) is None
    assert oracle(ALL, 0) is None
    assert training_domain([], 2) is None and oracle([], 2) is None and leave_one_domain_out([], 2) is None


def test_leave_one_domain_out_picks_draw_and_step_by_pair_accuracy():
    s = leave_one_domain_out(ALL, 2)
    assert (s.hash, s.hparams_seed, s.step) == ("a", 0, 10)
    assert s.val_acc == pytest.approx(0.70) and s.test_acc == pytest.approx(0.42)


def test_leave_one_domain_out_skips_draw_with_missing_pair():
    # Draw 0 lacks its (2, 1) pair -> only draw 1 is scored: step 20, val .68, test B's .33.
    s = leave_one_domain_out([A, B, P0_0, P1_0, P1_1], 2)
    assert (s.hash, s.hparams_seed, s.step) == ("b", 1, 20)
    assert s.val_acc == pytest.approx(0.68) and s.test_acc == pytest.approx(0.33)


def test_leave_one_domain_out_missing_pair_everywhere_is_none():
    assert leave_one_domain_out([A, B, P0_0, P1_0], 2) is None
    assert leave_one_domain_out([P0_0, P0_1, P1_0, P1_1], 2) is None  # no single-env trial


def test_leave_one_domain_out_skips_steps_a_pair_lacks():
    # Draw 0's (2, 0) pair has no step 10 -> steps 0 (.45) and 20 (.65) remain -> step 20, A's in2 = .45.
    p00 = pair("p00", 0, 0, {0: 0.50, 20: 0.70})
    s = leave_one_domain_out([A, p00, P0_1], 2)
    assert (s.step, s.hash) == (20, "a") and s.val_acc == pytest.approx(0.65) and s.test_acc == pytest.approx(0.45)


def test_ties_break_by_hparams_seed_then_earliest_step():
    same = [rec(0, (0.5, 0.5, 0.5), (0.1, 0.1, 0.1)), rec(10, (0.5, 0.5, 0.5), (0.2, 0.2, 0.2))]
    t0, t1 = trial("zz", 0, [2], same), trial("aa", 1, [2], same)
    for trials in ([t0, t1], [t1, t0]):
        s = training_domain(trials, 2)
        assert (s.hash, s.hparams_seed, s.step) == ("zz", 0, 0)
        assert oracle(trials, 2).hash == "zz"


def test_non_finite_and_missing_values_are_skipped():
    bad = trial("x", 0, [2], [rec(0, (float("nan"), 0.9, 0.9), (0.9, 0.9, 0.9)), {"step": 5, "loss": 1.0},
                              rec(10, (0.2, 0.2, 0.2), (0.3, 0.3, 0.3))])
    s = training_domain([bad], 2)
    assert s.step == 10
    assert oracle([bad], 2).step == 10  # the last record lacks accuracies -> last usable record
    assert training_domain([trial("e", 0, [2], [])], 2) is None


def test_selection_is_frozen():
    s = training_domain(ALL, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.step = 0  # type: ignore[misc]


def test_registry_names_and_titles():
    assert list(RULES) == ["training_domain", "oracle", "leave_one_domain_out", "worst_group"]
    assert RULES["training_domain"].title == "training-domain validation"
    assert RULES["leave_one_domain_out"].title == "leave-one-domain-out"
    assert RULES["oracle"].title == "test-domain validation (oracle)"
    assert sel.rule_title("oracle") == "test-domain validation (oracle)"
    # Pools say which trials a rule looks at (the report counts them).
    assert {t["hash"] for t in RULES["oracle"].pool(ALL, 2)} == {"a", "b"}
    # The pair of draw 5 has no single-env trial beside it: not considered.
    assert {t["hash"] for t in RULES["leave_one_domain_out"].pool(ALL, 2)} == {"a", "b", "p00", "p01", "p10", "p11"}


def test_adding_a_rule_is_one_decorated_function():
    try:
        @selection_rule("last_step_best_train", "last step, training-domain")
        def last_step(trials, test_env):
            return oracle(trials, test_env)

        assert RULES["last_step_best_train"] is last_step and last_step.rule_name == "last_step_best_train"
        with pytest.raises(ValueError, match="already registered"):
            selection_rule("last_step_best_train", "again")(lambda trials, test_env: None)
        with pytest.raises(ValueError, match="lowercase"):
            selection_rule("Bad", "bad")(lambda trials, test_env: None)
    finally:
        RULES.pop("last_step_best_train", None)


def test_leave_one_domain_out_duplicate_role_uses_lowest_hash():
    # Two (2, 0) pairs in draw 0: "p-dup" sorts before "p00" and wins; step 20 gives (.99 + .60)/2 = .795 -> step 20.
    dup = pair("p-dup", 0, 0, {0: 0.10, 10: 0.10, 20: 0.99})
    s = leave_one_domain_out([A, P0_0, dup, P0_1], 2)
    assert (s.hash, s.step) == ("a", 20) and s.val_acc == pytest.approx(0.795) and s.test_acc == pytest.approx(0.45)


# ---------------------------------------------------------------------------------------------- worst-group rule


def wg_rec(step: int, out_wg: tuple[float | None, float | None], out_acc: tuple[float, float], test_wg: float | None,
           test_acc: float) -> dict:
    """A record for 3 environments, test env 2: the training environments' out worst-group and plain accuracies,
    the test environment's in worst-group and plain accuracies (None: not recorded)."""
    r: dict = {"step": step, "env2_in_acc": test_acc, "env2_out_acc": 0.99, "env0_in_acc": 0.9, "env1_in_acc": 0.9}
    for i in (0, 1):
        r[f"env{i}_out_acc"] = out_acc[i]
        if out_wg[i] is not None:
            r[f"env{i}_out_worst_group_acc"] = out_wg[i]
    if test_wg is not None:
        r["env2_in_worst_group_acc"] = test_wg
    return r


# Draw 0: validation = min over the training envs' out worst-group accuracies:
#   step 0: min(.50, .40) = .40   step 10: min(.70, .45) = .45   step 20: min(.55, .52) = .52  -> step 20, test wg .20
#   (training-domain validation, mean out accuracy: .80, .85, .70 -> step 10 instead)
# Draw 1: step 10: min(.90, .50) = .50, step 20: min(.60, .51) = .51 -> step 20 (.51 < draw 0's .52), test wg .45
WG0 = trial("w0", 0, [2], [wg_rec(0, (0.50, 0.40), (0.80, 0.80), 0.30, 0.60),
                           wg_rec(10, (0.70, 0.45), (0.85, 0.85), 0.35, 0.70),
                           wg_rec(20, (0.55, 0.52), (0.70, 0.70), 0.20, 0.65)])
WG1 = trial("w1", 1, [2], [wg_rec(10, (0.90, 0.50), (0.95, 0.95), 0.50, 0.80),
                           wg_rec(20, (0.60, 0.51), (0.90, 0.90), 0.45, 0.75)])


def test_worst_group_picks_by_the_worst_training_group_and_reports_the_test_worst_group():
    s = sel.worst_group([WG1, WG0, *NOISE], 2)
    assert s == Selection(val_acc=pytest.approx(0.52), test_acc=pytest.approx(0.20), hash="w0", hparams_seed=0,
                          step=20)
    t = training_domain([WG1, WG0], 2)  # the mean-accuracy rule picks another checkpoint: draw 1, step 10
    assert (t.hash, t.step) == ("w1", 10) and t.test_acc == pytest.approx(0.80)


def test_worst_group_falls_back_to_an_environments_accuracy_and_the_test_accuracy():
    # env1 records no groups: its out accuracy stands in. step 0: min(.50, .65) = .50; step 10: min(.80, .60) = .60
    # -> step 10; the test env records no worst-group accuracy either: its plain in accuracy .41 is reported.
    t = trial("f", 0, [2], [wg_rec(0, (0.50, None), (0.9, 0.65), None, 0.33),
                            wg_rec(10, (0.80, None), (0.9, 0.60), None, 0.41)])
    s = sel.worst_group([t], 2)
    assert (s.step, s.val_acc, s.test_acc) == (10, pytest.approx(0.60), pytest.approx(0.41))


def test_worst_group_uses_a_named_validation_split_and_breaks_ties_by_draw_then_step():
    # The dataset names env2_out (WILDS' val beside its test split) as the validation split: its worst-group accuracy
    # alone decides, whatever the training environments say. Steps 10 and 20 tie at .70 -> the earlier one.
    recs = []
    for step, val, test in ((0, 0.60, 0.1), (10, 0.70, 0.2), (20, 0.70, 0.3)):
        r = wg_rec(step, (0.99, 0.99), (0.99, 0.99), test, 0.9)
        r["env2_out_worst_group_acc"] = val
        recs.append(r)
    a, b = trial("zz", 0, [2], recs), trial("aa", 1, [2], recs)
    for t in (a, b):
        t["dataset"] = {"validation_split": "env2_out"}
    s = sel.worst_group([b, a], 2)
    assert (s.hash, s.hparams_seed, s.step, s.test_acc) == ("zz", 0, 10, pytest.approx(0.2))
    nan = trial("n", 0, [2], [{**recs[1], "env2_out_worst_group_acc": float("nan")}, recs[0]])
    nan["dataset"] = {"validation_split": "env2_out"}
    assert sel.worst_group([nan], 2).step == 0  # a non-finite validation value is skipped
    assert sel.worst_group([a], 1) is None  # no trial holds out env 1

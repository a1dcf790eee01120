"""The coordination workload: games, learners, partner populations, the three methods and the report section.

Known answers (Hu et al., ICML 2020, the lever game): self-play agents earn 1.0 with themselves and about 1/9 with
independently seeded self-play agents; Other-Play agents pull the 0.9 lever and earn 0.9 with themselves and with
each other. Fictitious Co-Play best-responds to its training partners.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from shiftbench.config import SweepSpec, TrialSpec
from shiftbench.coordination import population as pop
from shiftbench.coordination.games import LeverGame, ParallelEnv, Rendezvous
from shiftbench.coordination.learners import LEARNERS, Rollout, play, selfplay_lineup
from shiftbench.coordination.report import learner_crossplay, method_crossplay
from shiftbench.errors import UserError
from shiftbench.models import build_model
from shiftbench.registry import METHODS
from shiftbench.report import scan_runs, write_report
from shiftbench.sweep import run_sweep
from shiftbench.trainer import Interrupted, RunOptions, load_dataset, run_trial

LEVER_OPTS = {"populations": 2, "agents": 3, "holdout": 1, "partner_steps": 60}
GRID_OPTS = {"populations": 2, "agents": 2, "holdout": 1, "partner_steps": 30, "eval_episodes": 16}
ODD_LEVER = 9  # LeverGame's 0.9 lever


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Partner populations go to a private cache folder for this module."""
    old = os.environ.get("SHIFTBENCH_CACHE")
    os.environ["SHIFTBENCH_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("SHIFTBENCH_CACHE")
    else:
        os.environ["SHIFTBENCH_CACHE"] = old


# ----------------------------------------------------------------------------------------------------------- games


def test_lever_game_pays_only_matching_levers_and_its_symmetries_fix_the_odd_one():
    game = LeverGame()
    a, b = torch.meshgrid(torch.arange(10), torch.arange(10), indexing="ij")
    _, reward, terminated, truncated = game.step(game.reset(100), torch.stack([a.flatten(), b.flatten()], 1))
    expected = torch.diag(torch.tensor([1.0] * 9 + [0.9]))
    assert torch.equal(reward.reshape(10, 10), expected) and terminated.all() and not truncated.any()
    _, act_perm = game.sample_symmetries(500, torch.Generator().manual_seed(0))
    assert (act_perm[:, ODD_LEVER] == ODD_LEVER).all()
    assert (act_perm.sort(1).values == torch.arange(10)).all()  # permutations
    assert len({tuple(p) for p in act_perm[:, :9].tolist()}) > 400  # drawn from all 9! relabellings


def test_other_play_value_of_each_lever_is_0_9_or_one_ninth():
    # Both seats commit to lever a; seat 1 plays through a random relabelling: E_phi J = 0.9 for the odd lever and
    # P(phi maps a to itself) = 1/9 for a 1.0 lever.
    game, n = LeverGame(), 9000
    torch.manual_seed(0)
    for lever, value in ((ODD_LEVER, 0.9), (0, 1 / 9)):
        roll = play(game, selfplay_lineup(game, n, relabel=True), lambda obs: torch.full((len(obs),), lever))
        se = math.sqrt(value * (1 - value) / n) if lever != ODD_LEVER else 0.0
        assert abs(float(roll.returns.mean()) - value) <= 3 * se + 1e-6


def test_rendezvous_hand_worked_meeting_walls_and_view():
    game = Rendezvous(size=5, horizon=3, view=1)  # cell = 5 x + y; corners 0, 4, 20, 24
    state = {"pos": torch.tensor([[1, 5], [0, 24]]), "t": torch.zeros(2, dtype=torch.long),
             "past": torch.zeros(2, 0, 2, dtype=torch.long)}
    obs = game.observe(state)
    assert obs.shape == (2, 2, 25 + 9 + 1)
    # Episode 0: (0,1) and (1,0) are diagonal neighbours: each sees the other at offset (+1,-1) / (-1,+1).
    assert obs[0, 0, 1] == 1 and obs[0, 1, 5] == 1
    assert obs[0, 0, 25 + 2 * 3 + 0] == 1 and obs[0, 1, 25 + 0 * 3 + 2] == 1
    assert obs[1, :, 25:34].sum() == 0  # episode 1: opposite corners, out of view
    # Up from (0,1) and left from (1,0) meet on corner (0,0); left from x = 0 is blocked by the wall.
    state, reward, terminated, truncated = game.step(state, torch.tensor([[1, 3], [3, 0]]))
    assert reward.tolist() == [1.0, 0.0] and terminated.tolist() == [True, False]
    assert state["pos"][1].tolist() == [0, 24]
    for _ in range(2):
        state, reward, terminated, truncated = game.step(state, torch.tensor([[0, 0], [0, 0]]))
    assert reward[1] == 0 and truncated[1] and not terminated[1]  # the horizon ran out


def test_rendezvous_frame_stack_shows_where_the_partner_came_from_hand_worked():
    # view 4 on a 5 x 5 grid: the partner is always in the 9 x 9 window; one past frame; frame = 25 + 81 cells.
    game = Rendezvous(size=5, horizon=12, view=4, memory=1)
    assert (game.frame_dim, game.obs_dim) == (106, 2 * 106 + 1)
    state = {"pos": torch.tensor([[6, 18]]), "t": torch.zeros(1, dtype=torch.long),
             "past": torch.full((1, 1, 2), -1)}  # (1,1) and (3,3), before any move
    obs = game.observe(state)[0]
    assert obs[0, 106:212].sum() == 0  # no past yet
    # Seat 0 sees its cell 6 and the partner at offset (+2,+2): window slot (2+4) * 9 + (2+4) = 60.
    assert obs[0, :106].nonzero().flatten().tolist() == [6, 25 + 60]
    # Seat 0 moves right (x+1) to (2,1) = cell 11; seat 1 moves up (y-1) to (3,2) = cell 17.
    state, _, _, _ = game.step(state, torch.tensor([[4, 1]]))
    obs = game.observe(state)[0]
    assert obs[0, :106].nonzero().flatten().tolist() == [11, 25 + (1 + 4) * 9 + (1 + 4)]  # now at (+1,+1)
    assert obs[0, 106:212].nonzero().flatten().tolist() == [6, 25 + 60]  # the frame before
    assert obs[1, 106:212].nonzero().flatten().tolist() == [18, 25 + (-2 + 4) * 9 + (-2 + 4)]
    assert obs[0, -1] == pytest.approx(1 / 12)


def test_parallel_env_follows_the_pettingzoo_parallel_api():
    env = ParallelEnv(Rendezvous())
    obs, infos = env.reset(seed=3)
    again, _ = ParallelEnv(Rendezvous()).reset(seed=3)
    assert set(obs) == set(infos) == {"player_0", "player_1"} == set(env.agents)
    assert all(o.shape == env.observation_space(a).shape for a, o in obs.items())
    assert all(np.array_equal(obs[a], again[a]) for a in obs)
    assert env.action_space("player_0").n == 5
    with pytest.raises(ValueError, match="missing"):
        env.step({"player_0": 0})
    for _ in range(12):
        obs, rewards, terms, truncs, _ = env.step({"player_0": 0, "player_1": 0})  # both stay: never meet
        if not env.agents:
            break
    assert truncs == {"player_0": True, "player_1": True} and rewards["player_0"] == 0.0 and env.agents == []
    with pytest.raises(RuntimeError, match="reset"):
        env.step({"player_0": 0, "player_1": 0})


@pytest.mark.parametrize("view, memory", [(1, 0), (4, 2)])
def test_rendezvous_symmetries_commute_with_observations_and_moves(view, memory):
    game = Rendezvous(size=5, view=view, memory=memory)
    g = torch.Generator().manual_seed(1)
    state = game.reset(200, g)
    state["t"] = torch.randint(0, 12, (200,), generator=g)
    for k in range(memory):  # a random past, with some episodes that began only k steps ago
        state["past"][:, k] = torch.where(torch.rand(200, 1, generator=g) < 0.2, -1,
                                          torch.randint(0, 25, (200, 2), generator=g))
    actions = torch.randint(0, 5, (200, 2), generator=g)
    obs_perms, act_perms = game._symmetries
    assert len({tuple(p) for p in obs_perms.tolist()}) == 8
    for k in range(8):
        moved = game.transform(state, k)
        assert torch.equal(game.observe(moved), game.observe(state)[:, :, obs_perms[k]])
        after, reward, _, _ = game.step(state, actions)
        after_g, reward_g, _, _ = game.step(moved, act_perms[k][actions])
        assert torch.equal(after_g["pos"], game.transform(after, k)["pos"]) and torch.equal(reward_g, reward)
        assert torch.equal(after_g["past"], game.transform(after, k)["past"])


def test_lever_game_best_response_to_self_play_partners_is_worth_exactly_one_ninth():
    assert LeverGame().heldout_baseline() == Fraction(1, 9)
    assert LeverGame((1.0, 1.0, 0.5)).heldout_baseline() == Fraction(1, 2)
    # Independently, from the game's own rewards: a self-play partner pulls one of the nine 1.0 levers, each with
    # probability 1/9; the best reply to that mixture, over all ten levers, earns 1/9 (the 0.9 lever earns 0).
    game = LeverGame()
    a, b = torch.meshgrid(torch.arange(10), torch.arange(9), indexing="ij")
    _, reward, _, _ = game.step(game.reset(90), torch.stack([a.flatten(), b.flatten()], 1))
    value = reward.reshape(10, 9).double().mean(1)
    assert value.max().item() == pytest.approx(1 / 9, abs=1e-12) and value[ODD_LEVER] == 0


# -------------------------------------------------------------------------------------------------------- learners


@pytest.mark.parametrize("kind", ["ppo", "vdn"])
def test_learner_raises_its_self_play_return_on_the_gridworld(kind):
    game = Rendezvous(size=5, horizon=12)
    torch.manual_seed(0)
    hp = dict(pop.TRAIN_HPARAMS, weight_decay=0.0)
    model = pop.new_agent(game, hp)
    learner = LEARNERS[kind](model, hp)
    opt = torch.optim.Adam(list(model.parameters()) + learner.extra_parameters(), lr=hp["lr"])
    returns = [float(pop.selfplay_step(game, model, learner, opt, 64, s)["return"]) for s in range(90)]
    assert np.mean(returns[:10]) < 0.3  # random walkers rarely meet on a corner
    assert np.mean(returns[-10:]) > 0.8


@pytest.mark.parametrize("returns, chosen", [
    ([0.02, 0.1, 0.3, 0.45, 0.7, 0.9, 1.0], (0, 3, 6)),  # half of 1.0 is 0.5: 0.45 is nearer than 0.7
    ([0.0, 0.2, 0.3, 0.5, 0.6], (0, 2, 4)),  # half of 0.6 is 0.3
    ([0.0, 0.4, 0.6, 1.0], (0, 1, 3)),  # a tie (0.1 either side) goes to the earlier checkpoint
    ([0.0, 1.0], (0, 1)),
])  # fmt: skip
def test_fcp_keeps_the_initial_the_half_reward_and_the_final_checkpoint(returns, chosen):
    assert pop.fcp_choice(returns) == chosen


def test_population_keeps_fcp_checkpoints_and_ppo_partners_start_uniform(monkeypatch):
    game = Rendezvous(size=5, horizon=12, view=4, memory=1)
    spec = pop.PopulationSpec(game.spec(), (7,), steps=20, episodes=32, candidates=10)
    seen = []
    real = pop.selfplay_return
    monkeypatch.setattr(pop, "selfplay_return", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    bank = pop.load_population(game, spec)
    assert bank.checkpoint_steps == [[0, 2 * pop.fcp_choice(seen)[1], 20]]
    assert bank.checkpoint_returns == [[seen[i] for i in pop.fcp_choice(seen)]]
    assert len(seen) == 11 and seen[-1] > 0.5  # every 2 updates, and the final agent meets itself
    start = bank.outputs(bank.row(torch.tensor([0] * 4), 0), game.observe(game.reset(2)).flatten(0, 1))
    assert torch.equal(start, torch.zeros(4, 5))  # the initial checkpoint is the uniform policy
    final = pop.PopulationSpec(game.spec(), (7,), steps=20, episodes=32, checkpoints="final")
    assert pop.load_population(game, final).checkpoint_steps == [[20]]


def test_population_is_cached_by_content_and_rebuilt_identically(tmp_path, monkeypatch):
    game = LeverGame()
    spec = pop.PopulationSpec(game.spec(), (1, 2), steps=6, episodes=16, hparams=(("mlp_depth", 0),))
    monkeypatch.setenv("SHIFTBENCH_CACHE", str(tmp_path / "a"))
    first = pop.load_population(game, spec)
    assert (tmp_path / "a" / "coordination" / f"{spec.hash[:24]}.pt").exists()
    assert (first.n_agents, first.n_checkpoints) == (2, 3)

    def no_training(*args):
        raise AssertionError("a cached population was trained again")

    monkeypatch.setattr(pop, "train_agent", no_training)
    cached = pop.load_population(game, spec)
    monkeypatch.undo()
    monkeypatch.setenv("SHIFTBENCH_CACHE", str(tmp_path / "b"))
    rebuilt = pop.load_population(game, spec)
    for k, v in first.state_dict().items():
        assert torch.equal(v, cached.state_dict()[k]) and torch.equal(v, rebuilt.state_dict()[k])
    assert not torch.equal(first.w0[2], first.w0[5])  # two seeds, two different final agents


# --------------------------------------------------------------------------------------------------------- methods


@pytest.mark.parametrize("dataset, method, message", [
    ("lever_game", "erm", "method 'erm' does not train on coordination datasets such as 'lever_game'; methods "
                          "that do: cooperative, otherplay, selfplay"),
    ("colored_digits", "selfplay", "method 'selfplay' does not train on classification datasets such as "
                                   "'colored_digits'"),
])  # fmt: skip
def test_methods_refuse_task_types_they_do_not_support(dataset, method, message):
    with pytest.raises(UserError, match=message):
        TrialSpec.resolve(dataset, method)


def test_partner_dro_weights_the_worst_served_population_hand_worked():
    # Two training populations of two episodes each; returns 1, 1 (population 0) and 0, 0 (population 1):
    # risks 0 and 1, q = softmax(log(1/2) + 1 * risk) = (1, e) / (1 + e); an episode weighs 4 q_e / 2.
    cls = METHODS.get("cooperative")
    hp = {k: v.default for k, v in cls.hparam_space().items()} | {"partner_dro_eta": 1.0}
    alg = cls(build_model("mlp", (1,), 10, {"mlp_depth": 0}), None, 2, hp)
    alg.world = SimpleNamespace(game=LeverGame())
    roll = Rollout(*([None] * 4), returns=torch.tensor([1.0, 1.0, 0.0, 0.0]), outcome=None)
    weights = alg.episode_weights(roll, [{"partner": torch.zeros(2)}, {"partner": torch.zeros(2)}])
    q1 = math.e / (1 + math.e)
    assert torch.allclose(alg.q, torch.tensor([1 - q1, q1]))
    assert torch.allclose(weights, torch.tensor([2 * (1 - q1)] * 2 + [2 * q1] * 2))
    assert math.isclose(float(weights.mean()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize("dataset, method, options, hparams", [
    ("lever_game", "cooperative", LEVER_OPTS, {"partner_dro_eta": 1.0}),  # target network, q buffer, partner draws
    ("rendezvous", "otherplay", GRID_OPTS, {"batch_size": 8}),  # value head, symmetry draws
])  # fmt: skip
def test_coordination_trial_resumes_exactly(dataset, method, options, hparams, tmp_path):
    spec = TrialSpec.resolve(dataset, method, steps=13, eval_every=4, dataset_options=options, hparams=hparams)
    whole = run_trial(spec, tmp_path / "whole")
    with pytest.raises(Interrupted):
        run_trial(spec, tmp_path / "cut", RunOptions(stop_after=4))
    resumed = run_trial(spec, tmp_path / "cut")
    timing = {"elapsed", "step_time"}
    assert {k: v for k, v in whole["record"].items() if k not in timing} == \
        {k: v for k, v in resumed["record"].items() if k not in timing}  # fmt: skip
    wa = torch.load(tmp_path / "whole" / "model.pt", weights_only=True)
    wb = torch.load(tmp_path / "cut" / "model.pt", weights_only=True)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# ------------------------------------------------------------------------------------- the lever game, end to end


@pytest.fixture(scope="module")
def lever_sweep(tmp_path_factory):
    """Four seeds of each method on the lever game, through the sweep driver (no MLflow)."""
    out = tmp_path_factory.mktemp("lever_sweep")
    sweep = SweepSpec(datasets=("lever_game",), methods=("selfplay", "otherplay", "cooperative"), name="lever",
                      test_envs="default", n_seeds=4, steps=120, eval_every=40,
                      dataset_options={"lever_game": LEVER_OPTS})  # fmt: skip
    counts = run_sweep(sweep, out, progress=False, track=False)
    assert counts["done"] == 12 and counts["failed_total"] == 0
    trials = scan_runs(out).done
    return out, {m: sorted((t for t in trials if t["spec"]["method"] == m), key=lambda t: t["spec"]["seed"])
                 for m in ("selfplay", "otherplay", "cooperative")}  # fmt: skip


def _self_lever(trial) -> int:
    preds = np.load(os.path.join(trial["dir"], "predictions.npz"))
    return int(preds["pred"][preds["split"] == "self"][0])


@pytest.mark.slow
def test_lever_game_self_play_and_other_play_reach_the_known_returns(lever_sweep):
    _, by_method = lever_sweep
    sp, op = by_method["selfplay"], by_method["otherplay"]
    assert all(t["records"][-1]["self_return"] == pytest.approx(1.0) for t in sp)
    assert all(_self_lever(t) != ODD_LEVER for t in sp)
    assert all(t["records"][-1]["self_return"] == pytest.approx(0.9) for t in op)
    assert all(_self_lever(t) == ODD_LEVER for t in op)
    off = ~np.eye(4, dtype=bool)
    sp_cross = learner_crossplay(sp)[off].mean()
    op_cross = learner_crossplay(op)[off].mean()
    # Four independent self-play seeds: each of the 6 pairs matches with probability 1/9 (expected 0.11);
    # 0.4 would need 3 matching pairs, which happens with probability under 3%.
    assert sp_cross < 0.4
    assert op_cross == pytest.approx(0.9)


@pytest.mark.slow
def test_fictitious_co_play_best_responds_to_its_training_partners(lever_sweep):
    _, by_method = lever_sweep
    payoffs = LeverGame().payoffs
    for trial in by_method["cooperative"]:
        data = load_dataset("lever_game", trial["spec"]["dataset_options"])  # each trial seed has its partners
        bank = data.world.bank
        assert bank.n_checkpoints == 1  # final checkpoints only: a VDN agent's earlier ones are other levers
        test = trial["spec"]["test_envs"]
        agents = [int(a) for i, e in enumerate(data.environments) if i not in test
                  for a in e.splits["in"].tensors["partner"]]  # fmt: skip
        rows = torch.tensor([int(bank.row(torch.tensor(a), c)) for a in agents for c in range(bank.n_checkpoints)])
        counts = Counter(bank.act(rows, torch.ones(len(rows), 1), greedy=True).tolist())
        value = {a: float(payoffs[a]) * counts.get(a, 0) / len(rows) for a in range(10)}
        # The learner pulls the lever its partners (all checkpoints) reward most: within one partner of the best.
        assert value[_self_lever(trial)] >= max(value.values()) - 1.0 / len(rows)
        assert value[_self_lever(trial)] > np.mean(list(value.values()))


@pytest.mark.slow
def test_report_has_the_coordination_table_and_crossplay_plot(lever_sweep, tmp_path):
    out, _ = lever_sweep
    metrics = write_report(scan_runs(out).done, tmp_path / "rep")
    section = metrics["sections"]["coordination"]["lever_game"]
    assert set(section["methods"]) == {"selfplay", "otherplay", "cooperative"}
    assert section["methods"]["otherplay"]["crossplay"]["mean"] == pytest.approx(0.9)
    assert section["methods"]["selfplay"]["self"] == {"mean": pytest.approx(1.0), "se": pytest.approx(0.0), "n": 4}
    assert len(section["labels"]) == 12 and np.asarray(section["crossplay"]).shape == (12, 12)
    text = (tmp_path / "rep" / "leaderboard.md").read_text()
    assert "## Coordination: self-play and cross-play" in text
    assert "| otherplay | vdn | 0.900 ± 0.000 |" in text
    assert "Held-out baseline: a best response to independently seeded self-play partners earns 0.111" in text
    assert section["heldout_baseline"] == pytest.approx(1 / 9)
    by_method = section["method_crossplay"]
    assert by_method["otherplay"]["otherplay"] == pytest.approx(0.9)
    assert "| otherplay | " in text.split("Cross-play by method")[1]
    assert (tmp_path / "rep" / "plots" / "crossplay_lever_game.png").read_bytes().startswith(b"\x89PNG")
    assert len((tmp_path / "rep" / "coordination" / "crossplay_lever_game.csv").read_text().splitlines()) == 13


def test_method_crossplay_averages_pairs_of_distinct_agents_hand_worked():
    m = np.array([[1.0, 0.2, 0.0, 0.6],
                  [0.4, 1.0, 0.1, 0.3],
                  [0.5, 0.7, 0.9, 0.8],
                  [0.0, 0.0, 0.0, 0.0]])  # fmt: skip
    out = method_crossplay(m, ["a", "a", "b", "c"])
    assert out["a"]["a"] == pytest.approx((0.2 + 0.4) / 2)  # the diagonal (self-play) is left out
    assert out["a"]["b"] == pytest.approx((0.0 + 0.1) / 2) and out["b"]["a"] == pytest.approx((0.5 + 0.7) / 2)
    assert out["a"]["c"] == pytest.approx((0.6 + 0.3) / 2) and out["c"]["b"] == 0.0
    assert out["b"]["b"] is None and out["c"]["c"] is None  # one agent: no distinct pair


def test_attested_coordination_trial_verifies_by_replaying_its_partners(tmp_path, monkeypatch):
    # re-execution needs the method's game and partners (set up by setup()); a forged prediction is caught
    from shiftbench.attest.verify import verify_path

    monkeypatch.setenv("SHIFTBENCH_HOME", str(tmp_path / "home"))
    spec = TrialSpec.resolve("lever_game", "otherplay", steps=20, eval_every=10, dataset_options=LEVER_OPTS,
                             callbacks=("attest",))
    trial = tmp_path / "runs" / "trials" / spec.short_hash
    run_trial(spec, trial)
    (result,), _ = verify_path(tmp_path / "runs", reexecute=6, seed=0)
    assert result.failures == [] and "all match" in result.notes[-1]
    weights = torch.load(trial / "model.pt", weights_only=True)
    torch.save({k: torch.zeros_like(v) for k, v in weights.items()}, trial / "model.pt")
    (result,), _ = verify_path(tmp_path / "runs", reexecute=6, seed=0)
    assert any("model.pt" in f for f in result.failures)

"""Coordination workloads: environments are partner populations; the test environment's partners are never met.

Each environment ``pop{i}`` is a population of independently seeded self-play agents (with their past
checkpoints), trained deterministically from the dataset options and cached (:mod:`shiftbench.coordination.
population`); its ``in`` split holds ``agents - holdout`` of them, its ``out`` split the other ``holdout`` (validation
partners, also never trained with). An example is a partner id; its evaluation plays the learner with that agent's
final checkpoint. An extra split, ``self``, pairs the learner with itself, so every record holds the self-play
return (``self_return``) beside the cross-play returns (``env{i}_{in,out}_return``); ``acc`` is the return
normalised by the game's optimum.

``shiftbench.coordination.task`` registers the ``coordination`` task type when this module is imported.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Mapping

import numpy as np
import torch

import shiftbench.coordination.task  # noqa: F401  (registers the "coordination" task type)
from shiftbench.config import canonical_json
from shiftbench.coordination.games import Game, LeverGame, Rendezvous
from shiftbench.coordination.population import PopulationSpec, load_population, new_agent
from shiftbench.coordination.world import SELF, PartnerSplit, World, crossplay
from shiftbench.data import SEED, Environment, ShiftDataset, tensor_digest
from shiftbench.errors import UserError
from shiftbench.hparams import NON_NEGATIVE, POSITIVE, HParam, Rule, choice, fixed, seed_hash
from shiftbench.registry import DATASETS
from shiftbench.settings import Setting, with_defaults

class CoordinationDataset(ShiftDataset):
    """Partner populations of one game as environments (see the module docstring)."""

    TASK = "coordination"
    DEFAULT_MODEL = "mlp"
    DEFAULT_TEST_ENVS = (0,)
    COMMON_OPTIONS: ClassVar[dict[str, Setting]] = {
        "seed": SEED.with_help("seed of the partner agents' training seeds; a trial uses its trial seed unless this is "
                               "set"),
        "populations": Setting(4, "partner populations, the environments",
                               Rule("at least 2 (one to train with, one held out)", lambda v: v >= 2)),
        "agents": Setting(5, "partner agents per population", POSITIVE),
        "holdout": Setting(1, "agents per population in its 'out' split (1 <= holdout < agents)", POSITIVE),
        "partner_steps": Setting(100, "self-play updates per partner agent", POSITIVE),
        "partner_learner": Setting("ppo", "how the partners learn: ppo or vdn", choices=("ppo", "vdn")),
        "partner_checkpoints": Setting("fcp", "the partners' kept weights: fcp (initial, middle, final) or final",
                                       choices=("fcp", "final")),
        "eval_episodes": Setting(64, "evaluation episodes per partner", POSITIVE),
        "greedy_eval": Setting(False, "evaluate with the argmax action instead of sampling"),
    }  # fmt: skip

    PARTNER_HPARAMS: ClassVar[dict[str, Any]] = {}
    """Overrides of the partners' training hyperparameters (``population.TRAIN_HPARAMS``)."""

    @classmethod
    def make_game(cls, options: Mapping[str, Any]) -> Game:
        """The game of these (resolved) options."""
        raise NotImplementedError

    @classmethod
    def environment_names(cls, options: Mapping[str, Any]) -> list[str]:
        return [f"pop{i}" for i in range(cls.resolve_options(options)["populations"])]

    @classmethod
    def check_options(cls, options):
        super().check_options(options)
        if not 1 <= options["holdout"] < options["agents"]:
            raise UserError(f"dataset {cls.registry_name}: need 1 <= holdout < agents (got "
                            f"holdout={options['holdout']}, agents={options['agents']})")  # fmt: skip

    @classmethod
    def check(cls, root, options, download):
        # Generated data: the sweep driver builds (and caches) the partner populations once, before workers start.
        cls(root, options, download)

    def agent_seeds(self) -> np.ndarray:
        """``(populations, agents)`` training seeds of the partner agents."""
        o = self.options
        return np.array([[seed_hash(o["seed"], "agent", p, a) for a in range(o["agents"])]
                         for p in range(o["populations"])])  # fmt: skip

    def __init__(self, root=None, options=None, download=False):
        super().__init__(root, options, download)
        o = self.options
        self.game = self.make_game(o)
        self.input_shape, self.num_classes = (self.game.obs_dim,), self.game.n_actions
        seeds = self.agent_seeds()
        self.population = PopulationSpec(self.game.spec(), tuple(int(s) for s in seeds.flatten()), o["partner_steps"],
                                         checkpoints=o["partner_checkpoints"], learner=o["partner_learner"],
                                         hparams=tuple(self.PARTNER_HPARAMS.items()))
        bank = load_population(self.game, self.population)
        self.world = World(self.game, bank, o["eval_episodes"], o["greedy_eval"])
        n_in = o["agents"] - o["holdout"]
        self.environments = []
        for p, name in enumerate(self.environment_names(o)):
            ids = torch.arange(p * o["agents"], (p + 1) * o["agents"])
            part = {"partner": ids, "idx": torch.arange(o["agents"]), "seed": torch.as_tensor(seeds[p])}
            self.environments.append(Environment(name, {
                "in": PartnerSplit({k: v[:n_in] for k, v in part.items()}, self.world),
                "out": PartnerSplit({k: v[n_in:] for k, v in part.items()}, self.world),
            }))  # fmt: skip

    def eval_splits(self):
        splits = super().eval_splits()
        splits["self"] = PartnerSplit({"partner": torch.tensor([SELF]), "idx": torch.tensor([0])}, self.world)
        return splits

    def evaluate(self, split_name, outputs):
        return {**super().evaluate(split_name, outputs), "return": float(np.mean(outputs["score"]))}

    def version(self):
        arrays = {f"bank/{k}": v for k, v in self.world.bank.state_dict().items()}
        arrays.update({f"{e.name}/{s}/{k}": v for e in self.environments for s, sp in e.splits.items()
                       for k, v in sp.tensors.items()})  # fmt: skip
        arrays["game"] = torch.tensor(list(canonical_json(self.game.spec()).encode()))
        return tensor_digest(arrays)

    @functools.cached_property
    def population_crossplay(self) -> list[list[float]]:
        """Returns of every ordered pair of final-checkpoint partner agents (rows and columns in id order)."""
        bank = self.world.bank
        agents = []
        for a in range(bank.n_agents):
            model = new_agent(self.game, self.population.train_hparams)
            model.load_state_dict(bank.state_of(a))
            agents.append((model, self.population.learner))
        return crossplay(self.game, agents, self.options["eval_episodes"], self.options["greedy_eval"]).tolist()

    def describe(self):
        bank, baseline = self.world.bank, self.game.heldout_baseline()
        return {**super().describe(), "game": self.game.spec(), "optimum": self.game.optimum,
                "heldout_baseline": None if baseline is None else float(baseline),
                "population": {**self.population.to_dict(), "hash": self.population.hash},
                "population_checkpoints": {"steps": bank.checkpoint_steps, "selfplay_return": bank.checkpoint_returns},
                "population_crossplay": self.population_crossplay}  # fmt: skip


@DATASETS.register("lever_game")
class LeverGameDataset(CoordinationDataset):
    """Other-Play's lever game (Hu et al., ICML 2020); partners are self-play agents from other seeds."""

    # Final checkpoints only: a VDN agent acts by argmax, so its random initialisation and half-trained network are
    # not weak partners but other arbitrary levers.
    OPTIONS = with_defaults(CoordinationDataset.COMMON_OPTIONS, partner_learner="vdn", partner_checkpoints="final",
                            eval_episodes=2, greedy_eval=True)
    N_STEPS = 150
    EVAL_EVERY = 25
    # The game is stateless, so its agents are tables: an MLP without hidden layers on the constant observation.
    # VDN's team exploration is what finds Other-Play's optimum here (see its docstring).
    HPARAMS = {"mlp_depth": HParam(0, fixed(0)), "learner": HParam("vdn", fixed("vdn"))}
    PARTNER_HPARAMS = {"mlp_depth": 0}

    @classmethod
    def make_game(cls, options):
        return LeverGame()


@DATASETS.register("rendezvous")
class RendezvousDataset(CoordinationDataset):
    """A partially observable gridworld where two agents must meet on the same corner; partners from other seeds."""

    # 2 training populations x 8 agents = 16 partner seeds (Strouse et al. train with 32); a view of the whole grid
    # and one past frame, so an agent can see where its partner is heading and follow it.
    OPTIONS = {**with_defaults(CoordinationDataset.COMMON_OPTIONS, populations=3, agents=9, partner_steps=60),
               "size": Setting(5, "side of the square grid (goals at its corners)", Rule(">= 3", lambda v: v >= 3)),
               "horizon": Setting(12, "steps before an episode ends unmet", POSITIVE),
               "view": Setting(4, "an agent sees its partner's offset within this many cells in both axes",
                               NON_NEGATIVE),
               "memory": Setting(1, "past steps' frames stacked into an observation", NON_NEGATIVE)}  # fmt: skip
    N_STEPS = 1000  # Fictitious Co-Play needs about this many to learn to follow unseen partners (docs/coordination.md)
    EVAL_EVERY = 250
    HPARAMS = {"mlp_width": HParam(64, choice([32, 64, 128])), "mlp_depth": HParam(2, choice([1, 2]))}

    @classmethod
    def make_game(cls, options):
        return Rendezvous(options["size"], options["horizon"], options["view"], options["memory"])

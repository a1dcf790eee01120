"""Fictitious Co-Play: a best response to a population of self-play partners and their past checkpoints."""

from __future__ import annotations

import torch

from shiftbench.coordination.learners import Lineup
from shiftbench.coordination.method import CoordinationMethod
from shiftbench.hparams import HParam, choice, fixed
from shiftbench.methods.groupdro import groupdro_weights
from shiftbench.registry import METHODS


@METHODS.register("cooperative")
class FictitiousCoPlay(CoordinationMethod):
    """Fictitious Co-Play (Strouse, McKee, Botvinick, Hughes & Everett, "Collaborating with Humans without Human
    Data", NeurIPS 2021): the learner trains as a best response to a frozen, diverse population: independently
    seeded self-play agents and their past checkpoints (the dataset's training environments; the checkpoints the
    dataset kept: on ``rendezvous`` the paper's three, the initial network, the one at about half the final reward
    and the final one; on ``lever_game`` only the final one, since an argmax agent's earlier networks are not weak
    partners but other arbitrary levers).

    Each episode pairs the learner with the partner id the training batch drew, at a checkpoint drawn uniformly
    (only the final one when ``fcp_past_checkpoints`` is false), in a random seat; only the learner's seat is
    trained. Held-out populations (test environments) are never played in training. On the lever game no best
    response to self-play partners earns more than 1/9 in expectation with held-out ones
    (``LeverGame.heldout_baseline``); on ``rendezvous``, where the partner's heading is visible, it learns to follow
    partners it never met.

    With ``partner_dro_eta`` > 0 the training populations are weighted as in GroupDRO (Sagawa et al., ICLR 2020):
    q_e ∝ q_e exp(η (1 - normalised return of population e this step)), each episode's loss weighted by
    n_envs · q_e, so the worst-served population counts most. ``q`` is a buffer (checkpointed).
    """

    HPARAMS = {
        "fcp_past_checkpoints": HParam(True, fixed(True)),
        "partner_dro_eta": HParam(0.0, choice([0.0, 0.1, 1.0])),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        self.register_buffer("q", torch.full((n_envs,), 1.0 / n_envs))

    def lineup(self, minibatches, step):
        bank = self.world.bank
        agent = torch.cat([b["partner"] for b in minibatches]).cpu()
        n = len(agent)
        if self.hparams["fcp_past_checkpoints"]:
            checkpoint = torch.randint(bank.n_checkpoints, (n,))
        else:
            checkpoint = torch.full((n,), bank.n_checkpoints - 1)
        learner_seat = torch.randint(2, (n,))
        row = torch.where(learner_seat[:, None] == torch.arange(2), -1, bank.row(agent, checkpoint)[:, None])
        return Lineup(row)

    def episode_weights(self, roll, minibatches):
        if float(self.hparams["partner_dro_eta"]) <= 0:
            return None
        sizes = [len(b["partner"]) for b in minibatches]
        env = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
        normalised = roll.returns / self.world.game.optimum
        risk = 1.0 - torch.stack([normalised[env == e].mean() for e in range(len(sizes))])
        with torch.no_grad():
            self.q.copy_(groupdro_weights(self.q, risk.to(self.q.device), float(self.hparams["partner_dro_eta"])))
        # Population e's episodes share q_e of the total weight; the weights average to 1.
        return (self.q.cpu() * len(env) / torch.tensor(sizes, dtype=torch.float))[env]

"""Adversarial training: the loss on clean inputs plus λ times the loss on attacked ones."""

from __future__ import annotations

from dataclasses import replace

from shiftbench.algorithm import concat_batches
from shiftbench.attacks import Threat, parse_bounds, perturb
from shiftbench.hparams import HParam, choice, fixed, log_uniform
from shiftbench.methods.erm import ERM
from shiftbench.registry import METHODS


@METHODS.register("adversarial")
class Adversarial(ERM):
    """Adversarial training (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep Learning Models Resistant to
    Adversarial Attacks", ICLR 2018), with the clean term kept: ``L(x, y) + λ · L(x + δ, y)``, δ from PGD.

    Every step attacks the pooled training batch with ``shiftbench.attacks.perturb`` (the model in eval mode, so
    dropout does not change during the attack) under ``adv_threat``:

    * ``linf`` / ``l2``: PGD in the ε-ball, ``adv_steps`` steps of 2.5·ε/steps from a uniform random start
      (Madry et al.'s step rule), clipped to the valid input range ``adv_bounds`` (``auto``: the dataset's
      declared range, else the range of its training inputs, else unbounded; or ``lo:hi``, or ``none``);
    * ``spatial``: the worst of ``adv_k`` random rotations (±``adv_max_rotation``°) and translations
      (±``adv_max_shift`` of the side) per example (Engstrom et al., ICML 2019, whose defaults these are).

    Any continuous input works: the task's ``input_keys`` are attacked (images, or a preference pair's feature
    vectors, unbounded under ``auto``). ε, the threat and the range define the threat model and are not searched;
    λ and the number of PGD steps are.
    """

    HPARAMS = {
        "adv_threat": HParam("linf", fixed("linf")),
        "adv_eps": HParam(0.1, fixed(0.1)),
        "adv_steps": HParam(7, choice([3, 5, 7, 10])),
        "adv_lambda": HParam(1.0, log_uniform(-1, 1)),
        "adv_bounds": HParam("auto", fixed("auto")),
        "adv_max_rotation": HParam(30.0, fixed(30.0)),
        "adv_max_shift": HParam(0.1, fixed(0.1)),
        "adv_k": HParam(10, fixed(10)),
    }

    def __init__(self, model, task, n_envs, hparams):
        super().__init__(model, task, n_envs, hparams)
        h = self.hparams
        self.threat = Threat(kind=h["adv_threat"], eps=float(h["adv_eps"]), steps=int(h["adv_steps"]),
                             bounds=None if h["adv_bounds"] == "auto" else parse_bounds(str(h["adv_bounds"])),
                             max_rotation=float(h["adv_max_rotation"]),
                             max_shift=float(h["adv_max_shift"]), k=int(h["adv_k"]))

    def setup(self, context):
        super().setup(context)
        if self.hparams["adv_bounds"] == "auto":
            self.threat = replace(self.threat, bounds=context.input_range)

    def attack(self, batch):
        """The batch under this method's threat (training mode restored afterwards)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return perturb(self.scores, self.task, batch, self.threat)
        finally:
            self.model.train(was_training)

    def update(self, minibatches, step):
        batch = concat_batches(minibatches)
        adv = self.attack(batch)
        n = len(batch[self.task.input_keys[0]])
        scores = self.task.scores(self.model, concat_batches([batch, adv]))
        clean = self.task.loss(scores[:n], batch)
        robust = self.task.loss(scores[n:], adv)
        loss = clean + self.hparams["adv_lambda"] * robust
        self.step_on(loss)
        return {"loss": loss.detach(), "clean_loss": clean.detach(), "adv_loss": robust.detach()}

"""Deep feature re-weighting: the last layer retrained on group-balanced held-out data."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shiftbench.algorithm import MethodContext
from shiftbench.errors import UserError
from shiftbench.hparams import NON_NEGATIVE, HParam, log_uniform, seed_hash
from shiftbench.methods.crt import CRT
from shiftbench.methods.groups import column, group_cells, subset, training_splits
from shiftbench.registry import METHODS


@METHODS.register("dfr")
class DFR(CRT):
    """Deep Feature Reweighting (Kirichenko, Izmailov & Wilson, "Last Layer Re-Training is Sufficient for
    Robustness to Spurious Correlations", ICLR 2023), DFR^Val_Tr: CRT's frozen ERM featurizer and re-initialised head,
    the head trained with an ℓ1 penalty ``dfr_reg · ‖W‖_1`` (no weight decay) on a group-balanced subsample of the
    *training environments' held-out* (``out``, validation) splits, never a test environment's.

    The subsample is drawn once per trial seed: every group keeps ``min_g n_g`` of its held-out examples (a seeded
    choice), the rest are dropped; ``held_out`` records which (split, idx) pairs were kept. Their features are
    computed once by the frozen featurizer; each step draws ``batch_size · n_envs`` of them (epoch-wise seeded
    permutations, pure in the step). One subsample, not the paper's average over ten. Defaults and range of the
    penalty are SubpopBench's (0.1, ``10^U(−2, 0.5)``).
    """

    HPARAMS = {"dfr_reg": HParam(0.1, log_uniform(-2, 0.5), NON_NEGATIVE)}

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.head.parameters() if params is None else params, lr=self.hparams["lr"])

    def setup_data(self, context: MethodContext) -> None:
        cells = group_cells(training_splits(context, "out"))
        if not cells:
            raise UserError("dfr needs held-out (out) splits of the training environments; this dataset has none")
        groups = sorted({g for _, g, _ in cells})
        per_group = {g: sum(len(s) for _, h, s in cells if h == g) for g in groups}
        m = min(per_group.values())
        gen = torch.Generator().manual_seed(seed_hash(context.seed, "dfr subsample"))
        feats, labels, self.held_out = [], [], []
        for g in groups:
            pos = torch.randperm(per_group[g], generator=gen)[:m].sort().values
            offset = 0
            for name, h, split in cells:
                if h != g:
                    continue
                rows = pos[(pos >= offset) & (pos < offset + len(split))] - offset
                offset += len(split)
                if len(rows) == 0:
                    continue
                part = subset(split, rows)
                with torch.no_grad():
                    for b in part.eval_batches(512):
                        feats.append(self.task.features(self.model, b).float())
                        labels.append(b["y"])
                self.held_out += [(name, int(i)) for i in column(part, "idx").tolist()]
        self.features, self.labels = torch.cat(feats), torch.cat(labels)
        self.held_out_groups = {g: m for g in groups}
        self.seed = context.seed

    def head_batch(self, minibatches, step):
        n = len(self.labels)
        bs = min(n, int(self.hparams["batch_size"]) * self.n_envs)
        epoch, pos = divmod(step, n // bs)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_hash(self.seed, "dfr", epoch)))
        rows = perm[pos * bs : (pos + 1) * bs].to(self.labels.device)
        return self.features[rows], self.labels[rows], {}

    def head_loss(self, logits, y, batch):
        return F.cross_entropy(logits.float(), y) + float(self.hparams["dfr_reg"]) * self.model.head.weight.abs().sum()

"""Which trials can share a program, and how many of them to pack at once (``--pack auto``).

Trials share a program when they share everything that fixes the shapes and the schedule of the vectorised step:
dataset and its options (all but the data ``seed``: each member keeps its own data, so trial seeds, which re-draw
the data, still pack together), model and every model hyperparameter (``mlp_width``, ``mlp_depth``, ...), method,
steps, evaluation period, batch size and the number of held-out environments. Hyperparameters the method reads as
tensors (learning rate, weight decay, λ, anneal step, η), seeds and which environments are held out may differ.

This buckets by shape rather than padding and masking: a bucket wastes no arithmetic and no memory, but a random
search over batch size and width (DomainBed's 2³–2⁹ batches, 2⁶–2¹⁰ widths) puts almost every draw in its own
bucket, where it gains nothing over running alone. Padding to the bucket's largest width and batch would pack them,
at the cost of the padded arithmetic (up to (1024/64)² = 256× a width-64 draw's matmul work in a width-1024 pack).
"""

from __future__ import annotations

import math
from typing import Sequence

from ..algorithm import is_packable
from ..config import TrialSpec, canonical_json
from ..registry import METHODS, MODELS

MAX_K = 64
"""No pack is larger: past a few dozen members a CPU is compute-bound, and one failure's setup cost grows."""


def spec_reason(spec: TrialSpec) -> str | None:
    """Why a trial cannot be packed, judged from its spec alone (None: it may; ``member_reason`` rechecks the
    built trial)."""
    if not is_packable(METHODS.get(spec.method)):
        return f"method {spec.method} is not packable (see docs/packing.md)"
    dropout = [k for k, v in spec.hparams.items() if k.startswith(spec.model + "_") and k.endswith("dropout")
               and float(v or 0) > 0]  # fmt: skip
    if dropout:
        return f"{dropout[0]}={spec.hparams[dropout[0]]}: dropout masks are per-trial RNG draws"
    return None


def pack_key(spec: TrialSpec) -> str | None:
    """The bucket of a packable trial (None: it runs alone)."""
    if spec_reason(spec) is not None:
        return None
    prefix = spec.model + "_"
    return canonical_json({
        "dataset": spec.dataset,
        "options": {k: v for k, v in spec.dataset_options.items() if k != "seed"},
        "model": spec.model,
        "model_hparams": {k: v for k, v in spec.hparams.items() if k.startswith(prefix)},
        "method": spec.method,
        "steps": spec.steps,
        "eval_every": spec.eval_every,
        "batch_size": spec.hparams.get("batch_size"),
        "n_test_envs": len(spec.test_envs),
        "protocol": spec.protocol,
    })  # fmt: skip


def group_trials(specs: Sequence[TrialSpec], k: int | None = None) -> list[list[TrialSpec]]:
    """Buckets ``specs`` into packs of at most ``k`` (None: unbounded) compatible trials, in first-seen order;
    an unpackable trial is a pack of one. Every spec appears exactly once."""
    buckets: dict[str, list[TrialSpec]] = {}
    alone: list[list[TrialSpec]] = []
    order: list[object] = []
    for s in specs:
        key = pack_key(s)
        if key is None:
            alone.append([s])
            order.append(alone[-1])
            continue
        if key not in buckets:
            buckets[key] = []
            order.append(key)
        buckets[key].append(s)
    out: list[list[TrialSpec]] = []
    for item in order:
        group = buckets[item] if isinstance(item, str) else item
        size = len(group) if not k else max(1, int(k))
        out += [group[i : i + size] for i in range(0, len(group), size)]
    return out


def packs_of(specs: Sequence[TrialSpec], pack: str | int = "auto", device: str = "auto") -> list[list[TrialSpec]]:
    """What ``sweep --pack`` trains: ``group_trials``' buckets, each cut into packs of K (``auto``: ``choose_k`` of
    that bucket, so one large model does not shrink the packs of small ones); in first-seen order."""
    out: list[list[TrialSpec]] = []
    for group in group_trials(specs):
        k = max(1, int(pack) if pack != "auto" else choose_k(group, device))
        out += [group[i : i + k] for i in range(0, len(group), k)]
    return out


def trial_cost(spec: TrialSpec) -> tuple[int, int]:
    """(parameters, per-step examples) of a trial, from its spec (without loading data)."""
    import torch

    from ..config import dataset_class, env_names_of
    from ..models import build_model
    from ..registry import TASKS

    dcls = dataset_class(spec.dataset)
    shape = _input_shape(dcls, spec.dataset_options)
    n_classes = getattr(dcls, "num_classes", 2)
    with torch.device("meta"):
        model = build_model(spec.model, shape, TASKS.get(dcls.TASK)().n_outputs(n_classes), spec.hparams)
    params = sum(p.numel() for p in model.parameters())
    n_train = len(env_names_of(spec.dataset, spec.dataset_options)) - len(spec.test_envs)
    return params, int(spec.hparams.get("batch_size", 64)) * n_train


def _input_shape(dcls, options) -> tuple[int, ...]:
    """The per-example input shape a dataset class will have, without building its data."""
    probe = dcls.__new__(dcls)
    try:
        type(probe).__init__(probe, None, options)
        return tuple(probe.input_shape)
    except Exception:  # noqa: BLE001 -- datasets that build data in __init__: a nominal shape
        return (784,)


def choose_k(specs: Sequence[TrialSpec], device: str = "auto") -> int:
    """The pack size for ``--pack auto``: enough trials that one step's arithmetic outweighs Python's per-step
    overhead, within memory, and at most ``MAX_K`` or the number of trials.

    The work of one trial's step is about ``6 · parameters · examples`` flops (forward and backward); a pack
    targets 4e9 flops per step on CPU (tens of milliseconds of arithmetic, so Python's fixed overhead per step is
    a small share: K = 32 for colored_digits' default MLP at batch 64) and 2e11 on CUDA (enough kernels' work to
    fill the device). Memory: parameters, gradients and Adam's two moments (16 bytes per parameter) plus
    activations, within a quarter of free memory. Buckets smaller than K make smaller packs.
    """
    import torch

    from ..callbacks import resolve_device

    packable = [s for s in specs if pack_key(s) is not None]
    if not packable:
        return 1
    dev = resolve_device(device)
    params, examples = max((trial_cost(s) for s in packable[:8]), key=lambda c: c[0] * c[1])
    flops = 6 * params * examples
    target = 2e11 if dev.type == "cuda" else 4e9
    k = max(1, int(target // max(flops, 1)))
    per_trial_bytes = 16 * params + 4 * examples * 4 * max(1, int(math.sqrt(params)))
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
    else:
        free = _available_memory()
    k = min(k, max(1, int(free // 4 // max(per_trial_bytes, 1))))
    return int(max(1, min(k, MAX_K, len(packable))))


def _available_memory() -> int:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``; 4 GiB when unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30

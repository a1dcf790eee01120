"""The digits and MNIST datasets: DomainBed's protocol statistics, leakage, determinism and the IDX loader."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from shiftbench.data import TensorSplit
from shiftbench.datasets import digits as digits_mod
from shiftbench.datasets.digits import ColoredDigits, RotatedDigits, rotate
from shiftbench.datasets.mnist import MNIST_FILES, ColoredMNIST, RotatedMNIST, read_idx
from shiftbench.errors import UserError
from shiftbench.registry import DATASETS

SMALL = {"env_size": 300}


def tensors(ds, env: int, part: str) -> dict[str, torch.Tensor]:
    split = ds.environments[env].splits[part]
    assert isinstance(split, TensorSplit)
    return split.tensors


def env_tensors(ds, env: int) -> dict[str, torch.Tensor]:
    """``in`` and ``out`` of one environment concatenated."""
    a, b = tensors(ds, env, "in"), tensors(ds, env, "out")
    return {k: torch.cat([a[k], b[k]]) for k in a}


# --------------------------------------------------------------------------------------------- registry, shapes


def test_registered_with_environment_names():
    for name, cls in [("colored_digits", ColoredDigits), ("rotated_digits", RotatedDigits),
                      ("colored_mnist", ColoredMNIST), ("rotated_mnist", RotatedMNIST)]:  # fmt: skip
        assert DATASETS.get(name) is cls
        assert cls.TASK == "classification"
    assert ColoredDigits.ENVIRONMENTS == ColoredMNIST.ENVIRONMENTS == ("+90%", "+80%", "-90%")
    assert RotatedDigits.ENVIRONMENTS == RotatedMNIST.ENVIRONMENTS == ("0°", "15°", "30°", "45°", "60°", "75°")
    assert ColoredDigits.DEFAULT_TEST_ENVS == (2,)
    assert ColoredMNIST.DEFAULT_MODEL == "mnist_cnn" and ColoredDigits.DEFAULT_MODEL == "mlp"


def test_colored_digits_shapes_and_sizes():
    ds = ColoredDigits(options=SMALL)
    assert ds.env_names == list(ColoredDigits.ENVIRONMENTS)
    assert ds.input_shape == (2, 16, 16) and ds.num_classes == 2
    assert ds.describe()["sizes"] == {f"env{i}_{p}": n for i in range(3) for p, n in (("in", 240), ("out", 60))}
    for i in range(3):
        t = env_tensors(ds, i)
        assert t["x"].dtype == torch.float32 and t["x"].shape == (300, 2, 16, 16)
        assert 0.0 <= t["x"].min() and t["x"].max() <= 1.0
        for k in ("y", "idx", "color", "digit", "clean_label", "base"):
            assert t[k].dtype == torch.int64 and t[k].shape == (300,), k
        assert set(t["y"].tolist()) == {0, 1}
        assert sorted(t["idx"].tolist()) == list(range(300))  # unique within the environment


def test_rotated_digits_shapes_and_sizes():
    ds = RotatedDigits(options={"env_size": 100, "resolution": 12})
    assert ds.env_names == list(RotatedDigits.ENVIRONMENTS) and ds.num_classes == 10
    assert ds.input_shape == (1, 12, 12)
    for i in range(6):
        t = env_tensors(ds, i)
        assert t["x"].shape == (100, 1, 12, 12) and t["x"].dtype == torch.float32
        assert len(tensors(ds, i, "in")["y"]) == 80
        assert t["y"].min() >= 0 and t["y"].max() <= 9
        assert sorted(t["idx"].tolist()) == list(range(100))


def test_default_sizes_and_model_fit():
    from shiftbench.models import build_model

    for cls, n_envs, size, shape in [(ColoredDigits, 3, 4000, (2, 16, 16)), (RotatedDigits, 6, 2000, (1, 16, 16))]:
        ds = cls()
        assert len(ds.environments) == n_envs
        assert all(len(e.splits["in"]) + len(e.splits["out"]) == size for e in ds.environments)
        hp = {k: v.default for k, v in cls.HPARAMS.items()}
        model = build_model(ds.DEFAULT_MODEL, ds.input_shape, ds.num_classes, hp)
        batch = ds.environments[0].splits["in"].batch_at(0, 32, seed=0)
        assert model(batch["x"]).shape == (32, ds.num_classes)
        assert tuple(batch["x"].shape[1:]) == shape


def test_hparams_declared():
    hp = ColoredDigits.HPARAMS
    assert hp["mlp_width"].default == 256 and hp["mlp_depth"].default == 2 and hp["mlp_dropout"].default == 0.0
    widths = {hp["mlp_width"].sample(np.random.RandomState(s)) for s in range(200)}
    assert min(widths) >= 64 and max(widths) <= 1024 and len(widths) > 20
    assert {hp["mlp_dropout"].sample(np.random.RandomState(s)) for s in range(50)} == {0.0, 0.1, 0.5}


def test_base_digits_are_sklearns():
    from sklearn.datasets import load_digits

    images, digits = digits_mod.load_base_digits()
    d = load_digits()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32 and images.max() == 1.0
    assert torch.equal(images[:, 0] * 16, torch.as_tensor(d.images, dtype=torch.float32))
    assert torch.equal(digits, torch.as_tensor(d.target, dtype=torch.int64))


# --------------------------------------------------------------------------------------------- protocol statistics


def test_colored_label_noise_and_color_agreement():
    ds = ColoredDigits()  # defaults: 4000 examples per environment
    for i, agree in enumerate((0.9, 0.8, 0.1)):
        t = env_tensors(ds, i)
        assert torch.equal(t["clean_label"], (t["digit"] < 5).long())
        flipped = (t["y"] != t["clean_label"]).float().mean().item()
        assert abs(flipped - 0.25) < 0.03, (i, flipped)
        agreement = (t["color"] == t["y"]).float().mean().item()
        assert abs(agreement - agree) < 0.03, (i, agreement)


def test_colored_digit_channel_follows_color():
    t = env_tensors(ColoredDigits(options=SMALL), 0)
    rows = torch.arange(len(t["x"]))
    assert (t["x"][rows, 1 - t["color"]] == 0).all()
    assert (t["x"][rows, t["color"]].flatten(1).sum(1) > 1.0).all()


def test_label_noise_option():
    t = env_tensors(ColoredDigits(options={**SMALL, "label_noise": 0.0}), 1)
    assert torch.equal(t["y"], t["clean_label"])


def test_rotated_environments_are_rotated():
    ds = RotatedDigits()
    means = [env_tensors(ds, i)["x"].mean(0, keepdim=True) for i in range(6)]
    assert (means[0] - means[5]).abs().max() > 0.1
    # rotating env 0's mean image counter-clockwise by 75 degrees lands near env 5's, clockwise does not
    ccw = (rotate(means[0], 75) - means[5]).abs().mean()
    cw = (rotate(means[0], -75) - means[5]).abs().mean()
    assert ccw < 0.5 * (means[0] - means[5]).abs().mean()
    assert ccw < 0.5 * cw


def test_rotate_matches_torchvision_direction():
    from torchvision.transforms.functional import InterpolationMode
    from torchvision.transforms.functional import rotate as tv_rotate

    img = torch.zeros(1, 1, 15, 15)
    img[0, 0, 2:5, 6:9] = 1.0  # a blob above the centre
    ours = rotate(img, 90)
    theirs = tv_rotate(img, 90.0, interpolation=InterpolationMode.BILINEAR)
    assert (ours - theirs).abs().max() < 1e-4
    assert ours[0, 0, 6:9, 2:5].min() > 0.99  # counter-clockwise: the blob moved to the left
    assert torch.equal(rotate(img, 0), img)


def test_copies_are_augmented():
    t = env_tensors(ColoredDigits(options={"env_size": 1500, "label_noise": 0.0}), 0)
    grey = t["x"].sum(1)
    base = t["base"]
    same = [(i, j) for i in range(200) for j in range(i + 1, len(base)) if base[i] == base[j]][:20]
    assert len(same) == 20
    for i, j in same:
        assert (grey[i] - grey[j]).abs().max() > 0.05  # two copies of one base digit differ


@pytest.mark.parametrize("noise", [0.05, 0.2])
def test_noise_option_sets_pixel_noise(noise):
    quiet = env_tensors(ColoredDigits(options={**SMALL, "noise": 0.0}), 0)
    noisy = env_tensors(ColoredDigits(options={**SMALL, "noise": noise}), 0)
    assert torch.equal(quiet["base"], noisy["base"])  # same copies and affine maps, only the noise differs
    grey_q, grey_n = quiet["x"].sum(1), noisy["x"].sum(1)
    mid = (grey_q > 0.3) & (grey_q < 0.7)  # away from the clipping at 0 and 1
    assert mid.sum() > 1000
    resid = (grey_n - grey_q)[mid]
    assert abs(resid.std().item() - noise) < 0.15 * noise and abs(resid.mean().item()) < 0.2 * noise


# --------------------------------------------------------------------------------------------- leakage


@pytest.mark.parametrize("cls", [ColoredDigits, RotatedDigits])
def test_base_digits_disjoint_between_environments_and_in_out(cls):
    ds = cls()
    seen: dict[int, tuple[int, str]] = {}
    n_base_in_env = []
    for i in range(len(ds.environments)):
        bases = {p: set(tensors(ds, i, p)["base"].tolist()) for p in ("in", "out")}
        assert not bases["in"] & bases["out"], f"env {i}: a base digit is in both in and out"
        for p, ids in bases.items():
            for b in ids:
                assert b not in seen, f"base digit {b} in env {i}/{p} and {seen[b]}"
                seen[b] = (i, p)
        n_base_in_env.append(len(bases["in"]) + len(bases["out"]))
        # the in/out split of base digits follows holdout_fraction
        assert abs(len(bases["out"]) / n_base_in_env[-1] - 0.2) < 0.01
    # every bundled digit is used (env_size exceeds the base count) and each environment gets an equal share
    assert len(seen) == 1797
    assert max(n_base_in_env) - min(n_base_in_env) <= 1
    # metadata agrees with the source digit
    _, digits = digits_mod.load_base_digits()
    t = tensors(ds, 0, "in")
    label = t["digit"] if "digit" in t else t["y"]
    assert torch.equal(label, digits[t["base"]])


def _identity_copies(monkeypatch):
    """Copies without the random affine jitter and, with ``noise=0``, without pixel noise: each copy's pixels are
    then exactly its base digit's (at resolution 8 no resampling happens), so a test can find the source digit of
    every example from its pixels alone."""
    monkeypatch.setattr(digits_mod, "random_affine_theta",
                        lambda n, g, **kw: torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(n, 2, 3).clone())
    digits_mod._build_cached.cache_clear()


def test_environments_and_in_out_are_disjoint_by_their_pixels(monkeypatch):
    """Disjointness read from the pixels, not from the ``base`` bookkeeping: every example's grey image (the two
    colour channels summed, one of them is zero) is looked up among the 1,797 bundled digits (all distinct)."""
    _identity_copies(monkeypatch)
    try:
        ds = ColoredDigits(options={"env_size": 4000, "resolution": 8, "noise": 0.0})
        images, _ = digits_mod.load_base_digits()
        row_of = {bytes(img.numpy().tobytes()): r for r, img in enumerate(images[:, 0])}
        owner: dict[int, tuple[int, str]] = {}
        for i in range(3):
            for part in ("in", "out"):
                t = tensors(ds, i, part)
                grey = t["x"].sum(1)
                rows = torch.tensor([row_of[bytes(g.numpy().tobytes())] for g in grey])  # KeyError: not a base digit
                assert torch.equal(rows, t["base"])  # the bookkeeping tells the truth
                for r in set(rows.tolist()):
                    assert owner.setdefault(r, (i, part)) == (i, part), f"digit {r} in env{i}/{part} and {owner[r]}"
        assert len(owner) == 1797
    finally:
        digits_mod._build_cached.cache_clear()


# --------------------------------------------------------------------------------------------- trial seed -> data


def _data(spec) -> ColoredDigits:
    return ColoredDigits(options=spec.dataset_options)


def test_trial_seeds_redraw_the_in_out_split_and_the_draws():
    from shiftbench.config import TrialSpec

    # 1200 copies per environment: its 240 out copies use all of its round(599 * 0.2) = 120 out base digits
    big = {"env_size": 1200, "resolution": 8}
    a, b = (TrialSpec.resolve("colored_digits", "erm", seed=s, dataset_options=big) for s in (0, 1))
    assert (a.dataset_options["seed"], b.dataset_options["seed"]) == (0, 1)
    da, db = _data(a), _data(b)
    for i in range(3):  # other base digits in every environment's out split, and other pixels
        out_a, out_b = (set(tensors(d, i, "out")["base"].tolist()) for d in (da, db))
        # independent draws share about 120 * (1/3 * 0.2) = 8 of them; a fixed split would share all 120
        assert len(out_a) == len(out_b) == 120 and len(out_a & out_b) < 30
        assert not torch.equal(tensors(da, i, "in")["x"], tensors(db, i, "in")["x"])
    # the colour draws differ too: agreement of colour and label per example
    ca, cb = (tensors(d, 0, "in")["color"] == tensors(d, 0, "in")["y"] for d in (da, db))
    assert not torch.equal(ca, cb)


def test_a_pinned_data_seed_gives_the_same_data_for_every_trial_seed():
    from shiftbench.config import TrialSpec

    a, b = (TrialSpec.resolve("colored_digits", "erm", seed=s, dataset_options={**SMALL, "seed": 7}) for s in (0, 1))
    assert a.dataset_options["seed"] == b.dataset_options["seed"] == 7 and a.hash != b.hash
    da, db = _data(a), _data(b)
    for i in range(3):
        for part in ("in", "out"):
            assert torch.equal(tensors(da, i, part)["base"], tensors(db, i, part)["base"])
            assert torch.equal(tensors(da, i, part)["x"], tensors(db, i, part)["x"])
    assert da.version() == db.version()


def test_every_dataset_with_a_seed_option_follows_the_trial_seed():
    from shiftbench.config import TrialSpec, supports_task
    from shiftbench.registry import METHODS

    seen = []
    for name in DATASETS.names():
        cls = DATASETS.get(name)
        if "seed" not in cls.OPTIONS or name in ("image_folder", "preference_files"):  # these need a path option
            continue
        method = next(m for m in METHODS.names() if supports_task(METHODS.get(m), cls.TASK))
        assert TrialSpec.resolve(name, method, seed=5).dataset_options["seed"] == 5, name
        assert TrialSpec.resolve(name, method, seed=5, dataset_options={"seed": 0}).dataset_options["seed"] == 0
        seen.append(name)
    assert {"colored_digits", "rotated_digits", "subpop_digits", "cue_digits", "spurious_prefs", "lever_game",
            "rendezvous", "colored_mnist", "pacs"} <= set(seen)


def test_the_dataset_cache_keys_on_the_effective_seed_and_a_sweep_groups_trials_by_it():
    from shiftbench.config import SweepSpec, TrialSpec

    digits_mod._build_cached.cache_clear()
    a0, a1, b0 = (_data(TrialSpec.resolve("colored_digits", "erm", seed=s, dataset_options=SMALL)) for s in (0, 1, 0))
    assert tensors(a0, 0, "in")["x"] is tensors(b0, 0, "in")["x"]  # the same build again
    assert not torch.equal(tensors(a0, 0, "in")["x"], tensors(a1, 0, "in")["x"])
    info = digits_mod._build_cached.cache_info()
    assert (info.hits, info.misses) == (1, 2)
    sweep = SweepSpec.from_mapping({"datasets": ["colored_digits"], "methods": ["erm", "irm"], "n_seeds": 3,
                                    "n_hparams": 2, "test_envs": "each"})
    seeds = [t.seed for t in sweep.trials()]
    assert seeds == [0] * 12 + [1] * 12 + [2] * 12  # one data seed at a time (the cache keeps 4 builds)


def test_the_protocol_version_enters_the_trial_hash():
    import dataclasses

    from shiftbench.config import PROTOCOL, TrialSpec

    spec = TrialSpec.resolve("colored_digits", "erm", seed=0, dataset_options=SMALL)
    assert spec.protocol == PROTOCOL == 2
    old = dataclasses.replace(spec, protocol=1)
    assert old.hash != spec.hash and old.short_hash != spec.short_hash
    # a spec.json written before versions existed (no "protocol" key) reads as version 1: never the new trial
    legacy = {k: v for k, v in spec.to_dict().items() if k != "protocol"}
    assert TrialSpec.from_dict(legacy).protocol == 1 and TrialSpec.from_dict(legacy).hash == old.hash
    assert TrialSpec.from_dict(spec.to_dict()).hash == spec.hash


# --------------------------------------------------------------------------------------------- determinism, cache


def test_same_seed_same_version_after_rebuild():
    a = ColoredDigits(options={**SMALL, "seed": 3})
    va, xa = a.version(), tensors(a, 0, "in")["x"]
    digits_mod._build_cached.cache_clear()
    b = ColoredDigits(options={**SMALL, "seed": 3})
    assert tensors(b, 0, "in")["x"] is not xa  # really rebuilt
    assert b.version() == va and len(va) == 64 and int(va, 16) >= 0
    assert torch.equal(tensors(b, 0, "in")["x"], xa)


@pytest.mark.parametrize("change", [{"seed": 1}, {"noise": 0.1}, {"env_size": 301}, {"resolution": 12}])
def test_changed_options_change_version(change):
    base = ColoredDigits(options=SMALL).version()
    assert ColoredDigits(options={**SMALL, **change}).version() != base


def test_rotated_seed_changes_data():
    a = RotatedDigits(options={"env_size": 60})
    b = RotatedDigits(options={"env_size": 60, "seed": 1})
    assert a.version() != b.version()
    assert not torch.equal(tensors(a, 0, "in")["base"], tensors(b, 0, "in")["base"])


def test_cache_shares_tensors_not_splits():
    a, b = ColoredDigits(options=SMALL), ColoredDigits(options={"env_size": "300"})  # CLI strings are coerced
    assert b.options["env_size"] == 300
    assert a.environments[0].splits["in"] is not b.environments[0].splits["in"]
    assert tensors(a, 0, "in")["x"] is tensors(b, 0, "in")["x"]


# --------------------------------------------------------------------------------------------- options


def test_unknown_option_is_a_user_error():
    with pytest.raises(UserError, match="env_sise"):
        ColoredDigits(options={"env_sise": 100})


@pytest.mark.parametrize(
    "options, key",
    [({"holdout_fraction": 1.5}, "holdout_fraction"), ({"env_size": 1}, "env_size"), ({"resolution": 2}, "resolution"),
     ({"noise": -0.1}, "noise"), ({"label_noise": 2.0}, "label_noise")],
)  # fmt: skip
def test_bad_option_values_are_user_errors(options, key):
    with pytest.raises(UserError, match=key):
        ColoredDigits(options=options)


# --------------------------------------------------------------------------------------------- MNIST (IDX files)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file: big-endian magic, big-endian 32-bit sizes, then the uint8 data."""
    return struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()


def write_fake_mnist(folder: Path, gz: bool, n_train: int = 60, n_test: int = 30, seed: int = 0):
    """Writes the four MNIST files with random images and labels; returns the pooled images and labels."""
    rng = np.random.RandomState(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pool_x, pool_y = [], []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        y = rng.randint(0, 10, size=n).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", x, 0x803), ("labels-idx1", y, 0x801)):
            name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
            data = idx_bytes(arr, magic)
            (folder / name).write_bytes(gzip.compress(data) if gz else data)
        pool_x.append(x)
        pool_y.append(y)
    return np.concatenate(pool_x), np.concatenate(pool_y).astype(np.int64)


@pytest.mark.parametrize("layout, gz", [("torchvision", False), ("flat", True), ("torchvision", True)])
def test_colored_mnist_from_idx(tmp_path, layout, gz):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    images, labels = write_fake_mnist(folder, gz)
    ds = ColoredMNIST(root=str(tmp_path))
    assert ds.input_shape == (2, 28, 28) and ds.env_names == ["+90%", "+80%", "-90%"]
    assert sum(len(s) for s in ds.eval_splits().values()) == 90
    assert [len(e.splits["in"]) for e in ds.environments] == [24, 24, 24]
    all_bases = []
    for i in range(3):
        t = env_tensors(ds, i)
        rows = torch.arange(len(t["x"]))
        expect = torch.from_numpy(images[t["base"].numpy()]).float()
        assert torch.equal(torch.round(t["x"][rows, t["color"]] * 255), expect)  # exact pixels, right channel
        assert (t["x"][rows, 1 - t["color"]] == 0).all()
        assert torch.equal(t["digit"], torch.from_numpy(labels[t["base"].numpy()]))
        assert torch.equal(t["clean_label"], (t["digit"] < 5).long())
        assert sorted(t["idx"].tolist()) == list(range(30))
        assert not set(tensors(ds, i, "in")["base"].tolist()) & set(tensors(ds, i, "out")["base"].tolist())
        all_bases += t["base"].tolist()
    assert sorted(all_bases) == list(range(90))  # train and test pooled, each image in exactly one environment
    assert len(ds.version()) == 64


def test_rotated_mnist_from_idx(tmp_path):
    images, labels = write_fake_mnist(tmp_path, gz=False, n_train=60, n_test=0)
    ds = RotatedMNIST(root=str(tmp_path))
    assert ds.input_shape == (1, 28, 28) and len(ds.environments) == 6 and ds.num_classes == 10
    t0, t1 = env_tensors(ds, 0), env_tensors(ds, 1)
    assert torch.allclose(t0["x"][:, 0] * 255, torch.from_numpy(images[t0["base"].numpy()]).float(), atol=1e-3)
    assert torch.equal(t0["y"], torch.from_numpy(labels[t0["base"].numpy()]))
    src1 = torch.from_numpy(images[t1["base"].numpy()]).float()[:, None] / 255
    assert (t1["x"] - src1).abs().mean() > 0.1  # 15 degrees is not the identity
    assert torch.allclose(t1["x"], rotate(src1, 15), atol=1e-5)
    small = RotatedMNIST(root=str(tmp_path), options={"resolution": 14, "n_examples": 36})
    assert small.input_shape == (1, 14, 14) and tensors(small, 3, "in")["x"].shape[1:] == (1, 14, 14)
    assert sum(len(s) for s in small.eval_splits().values()) == 36


def test_mnist_seed_and_files_change_version(tmp_path):
    write_fake_mnist(tmp_path / "a", gz=False)
    write_fake_mnist(tmp_path / "b", gz=False, seed=1)
    v = ColoredMNIST(root=str(tmp_path / "a")).version()
    assert ColoredMNIST(root=str(tmp_path / "a"), options={"seed": 1}).version() != v
    assert ColoredMNIST(root=str(tmp_path / "b")).version() != v
    assert ColoredMNIST(root=str(tmp_path / "a")).version() == v


def test_missing_mnist_is_a_one_line_user_error(tmp_path):
    with pytest.raises(UserError) as err:
        ColoredMNIST(root=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "\n" not in msg
    for name in MNIST_FILES.values():
        assert name in msg
    assert str(tmp_path / "nowhere" / "MNIST" / "raw") in msg and "--download" in msg and "--data-root" in msg
    with pytest.raises(UserError, match="--data-root"):
        RotatedMNIST(root=None)


def test_partial_mnist_is_a_user_error(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte"):
        ColoredMNIST(root=str(tmp_path))


def test_corrupt_idx_is_a_user_error(tmp_path):
    write_fake_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    images = tmp_path / "train-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(labels.read_bytes())  # wrong magic
    with pytest.raises(UserError, match="magic"):
        ColoredMNIST(root=str(tmp_path))
    images.write_bytes(good[:-5])  # truncated data
    with pytest.raises(UserError, match="bytes"):
        read_idx(images, 0x803)
    images.write_bytes(good)
    labels.write_bytes(idx_bytes(np.zeros(59, np.uint8), 0x801))  # 60 images, 59 labels
    with pytest.raises(UserError, match="labels"):
        RotatedMNIST(root=str(tmp_path))


def test_read_idx_dimensions(tmp_path):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)  # non-square: rows and columns in order
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(arr, 0x803)))
    out = read_idx(path, 0x803)
    assert out.shape == (2, 3, 5) and np.array_equal(out, arr)


def test_prepare_copies_the_mnist_files_so_a_sweep_reads_the_prepared_folder(tmp_path, capsys):
    from shiftbench.cli import main

    src = tmp_path / "src"
    write_fake_mnist(src / "MNIST" / "raw", gz=True)
    (src / "unrelated.bin").write_bytes(b"not mnist")  # other data under the root is not copied
    params = tmp_path / "params.yaml"
    params.write_text("datasets: [colored_mnist]\nmethods: [erm]\ntest_envs: default\n")
    out = tmp_path / "data"
    assert main(["prepare", "--params", str(params), "--out", str(out), "--data-root", str(src)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(f"MNIST/raw/{n}-ubyte.gz" for n in (
        "train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"))
    assert not (out / "unrelated.bin").exists()
    a, b = ColoredMNIST(root=str(src)), ColoredMNIST(root=str(out))
    assert a.version() == b.version()  # the prepared copy is the same data


@pytest.mark.parametrize("generic", [False, True], ids=["tensor-split", "base-class"])
def test_batches_at_are_batch_at_stacked_across_epochs(generic):
    """A pack gathers many steps at once: the rows must be those of batch_at step by step, across epoch ends."""
    from shiftbench.data import Split

    split = TensorSplit({"x": torch.arange(70.0).view(35, 2), "y": torch.arange(35), "idx": torch.arange(35) + 100})
    gather = (lambda *a, **k: Split.batches_at(split, *a, **k)) if generic else split.batches_at
    steps = range(2, 9)  # 35 // 8 = 4 batches per epoch: steps 4 and 8 start new epochs
    together = gather(steps, 8, 5, ("x", "y"))
    assert set(together) == {"x", "y"} and together["x"].shape == (7, 8, 2) and together["y"].shape == (7, 8)
    for j, k in enumerate(steps):
        alone = split.batch_at(k, 8, 5, ("x", "y"))
        assert torch.equal(together["x"][j], alone["x"]) and torch.equal(together["y"][j], alone["y"])
    firsts = [set(together["y"][j].tolist()) for j in range(2)]
    assert firsts[0].isdisjoint(firsts[1])  # one epoch draws without replacement
    out = {"x": torch.full((2, 7, 8, 2), -1.0)[1], "y": torch.zeros(7, 8, dtype=torch.long)}  # a pack's buffer row
    written = gather(steps, 8, 5, ("x", "y"), out)
    assert written["x"] is out["x"] and torch.equal(out["x"], together["x"]) and torch.equal(out["y"], together["y"])

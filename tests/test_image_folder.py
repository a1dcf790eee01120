"""DomainBed image folders (``root/<domain>/<class>/<image>``) and the torchvision ResNets, on tiny folders the tests
write: environments, DomainBed's in/out split, lazy decoding with seeded augmentation, weights without downloads,
bad files, and a sweep through to the leaderboard."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shiftbench.cli import main
from shiftbench.config import TrialSpec
from shiftbench.datasets.image_folder import eval_transform
from shiftbench.errors import UserError
from shiftbench.models import build_model
from shiftbench.registry import DATASETS

PACS_DOMAINS = ["art_painting", "cartoon", "photo", "sketch"]
CLASSES = ["dog", "giraffe", "horse"]



def make_folder(base: Path, domains=PACS_DOMAINS, per_class: int = 5, skip: tuple[str, str] | None = None) -> Path:
    """base/<domain>/<class>/<k>.jpg|png: 12x10 images whose colour encodes the class and the domain."""
    for d, domain in enumerate(domains):
        for c, cls in enumerate(CLASSES):
            if (domain, cls) == skip:
                continue
            folder = base / domain / cls
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                a = np.full((10, 12, 3), (80 * c, 60 * d, 10 * k), np.uint8)
                Image.fromarray(a).save(folder / f"{k}.{'png' if k % 2 else 'jpg'}")
    return base


def test_pacs_environments_and_domainbed_holdout(tmp_path):
    make_folder(tmp_path / "PACS", skip=("sketch", "horse"))
    ds = DATASETS.get("pacs")(str(tmp_path), {"resolution": 16})
    assert ds.env_names == ["A", "C", "P", "S"] and ds.num_classes == 3 and ds.input_shape == (3, 16, 16)
    for env, n in zip(ds.environments, (15, 15, 15, 10)):
        n_out = round(n * 0.2)
        ins, outs = env.splits["in"].tensors, env.splits["out"].tensors
        assert (len(ins["idx"]), len(outs["idx"])) == (n - n_out, n_out)
        assert set(ins["idx"].tolist()).isdisjoint(outs["idx"].tolist())
    # labels follow the class folders: class c's images have red = 80 c
    batch = next(ds.environments[0].splits["in"].eval_batches(64))
    red = batch["x"][:, 0].mean((1, 2)) * 0.229 + 0.485  # undo ImageNet normalisation
    assert torch.allclose(red, batch["y"].float() * 80 / 255, atol=0.02)
    assert len(ds.version()) == 64


def test_batches_are_pure_in_k_and_eval_is_the_plain_transform(tmp_path):
    make_folder(tmp_path / "PACS")
    ds = DATASETS.get("pacs")(str(tmp_path), {"resolution": 16})
    split = ds.environments[1].splits["in"]
    a, b, c = split.batch_at(5, 4, seed=3), split.batch_at(5, 4, seed=3), split.batch_at(6, 4, seed=3)
    assert torch.equal(a["x"], b["x"]) and torch.equal(a["idx"], b["idx"])
    assert not torch.equal(a["x"], c["x"])
    torch.manual_seed(0)
    expected = torch.rand(1)
    torch.manual_seed(0)
    split.batch_at(7, 4, seed=3)
    assert torch.equal(torch.rand(1), expected)  # augmentation leaves the caller's generator alone
    # evaluation decodes and resizes without augmentation: equal to the transform applied by hand
    first = next(split.eval_batches(2))
    by_hand = eval_transform(16)(Image.open(split.load.paths[0]).convert("RGB"))
    assert torch.allclose(first["x"][0], by_hand)
    # training batches are augmented (random crops, flips, jitter): not the evaluation tensors of the same images
    plain = {int(i): x for bt in split.eval_batches(64) for i, x in zip(bt["idx"], bt["x"])}
    aug = split.batch_at(0, len(split), seed=1)
    assert sorted(aug["idx"].tolist()) == sorted(plain)
    assert not any(torch.allclose(x, plain[int(i)], atol=1e-3) for i, x in zip(aug["idx"], aug["x"]))


def test_resnet_weights_never_download(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("downloaded"))
    with pytest.warns(UserWarning, match="nothing is downloaded"):
        random_init = build_model("resnet18", (3, 32, 32), 5, {})
    assert random_init.featurizer.loaded_from is None
    # a checkpoint already in the hub cache, under torchvision's file name, is used
    import torchvision

    torch.manual_seed(123)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    cache = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cache.parent.mkdir(parents=True)
    torch.save(reference, cache)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cached = build_model("resnet18", (3, 32, 32), 5, {})
    assert cached.featurizer.loaded_from == str(cache)
    assert torch.equal(cached.featurizer.net.conv1.weight, reference["conv1.weight"])
    cached.train()
    assert not cached.featurizer.net.bn1.training  # DomainBed freezes BatchNorm statistics of loaded weights
    # a local file by hyperparameter; a wrong file is one clear line
    other = build_model("resnet18", (2, 32, 32), 5, {"resnet18_weights": str(cache)})
    assert torch.equal(other.featurizer.net.conv1.weight[:, 1], reference["conv1.weight"][:, 1])
    assert other(torch.zeros(2, 2, 32, 32)).shape == (2, 5)
    torch.save({"w": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(UserError, match="is not a resnet18 state_dict"):
        build_model("resnet18", (3, 32, 32), 5, {"resnet18_weights": str(tmp_path / "bad.pt")})


def test_generic_image_folder_takes_domains_from_the_folder(tmp_path):
    make_folder(tmp_path / "mine", domains=["north", "south", "west"], per_class=3)
    spec = TrialSpec.resolve("image_folder", "erm", dataset_options={"path": str(tmp_path / "mine")})
    assert spec.test_envs == (0,)
    ds = DATASETS.get("image_folder")(None, {"path": str(tmp_path / "mine"), "resolution": 8})
    assert ds.env_names == ["north", "south", "west"]
    with pytest.raises(UserError, match="domains=A,B,C"):
        TrialSpec.resolve("image_folder", "erm", dataset_options={"path": "relative/folder"})
    with pytest.raises(UserError, match="holds 3 domain folders"):
        DATASETS.get("pacs")(str(tmp_path), {"path": "mine"})


@pytest.mark.slow
def test_sweep_trains_a_resnet_and_reports(tmp_path, capsys):
    make_folder(tmp_path / "data" / "VLCS", domains=["Caltech101", "LabelMe", "SUN09", "VOC2007"], per_class=4)
    suite = tmp_path / "suite.yaml"
    suite.write_text("datasets: [vlcs]\nmethods: [erm, groupdro]\nsteps: 4\neval_every: 2\nmodel: resnet18\n"
                     "test_envs: default\nhparams: {batch_size: 4, resnet18_weights: none}\n"
                     "dataset_options: {vlcs: {resolution: 32}}\n")  # fmt: skip
    code = main(["sweep", "--suite", str(suite), "--out", str(tmp_path / "runs"), "--data-root",
                 str(tmp_path / "data"), "--no-progress", "--no-mlflow"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "report.json").read_text())
    cells = metrics["datasets"]["vlcs"]["rules"]["training_domain"]["methods"]
    assert set(cells) == {"erm", "groupdro"} and cells["erm"]["env0"]["name"] == "C"
    for trial in (tmp_path / "runs" / "trials").iterdir():
        spec = json.loads((trial / "spec.json").read_text())
        rec = json.loads((trial / "results.jsonl").read_text().splitlines()[-1])
        p = np.load(trial / "predictions.npz")
        assert rec["env0_in_acc"] == pytest.approx(p["correct"][p["split"] == "env0_in"].mean())
        assert spec["data_version"] == spec["dataset"]["data"]["sha256"] and spec["dataset"]["classes"] == CLASSES


def test_truncated_image_is_one_line_and_nothing_finishes(tmp_path, capsys):
    make_folder(tmp_path / "PACS", per_class=3)
    victim = tmp_path / "PACS" / "art_painting" / "dog" / "0.jpg"
    victim.write_bytes(victim.read_bytes()[:40])
    code = main(["train", "--dataset", "pacs", "--method", "erm", "--steps", "2", "--model", "mlp", "--option",
                 "resolution=8", "--out", str(tmp_path / "t"), "--data-root", str(tmp_path), "--no-mlflow"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "cannot decode image" in err and str(victim) in err
    assert not (tmp_path / "t" / "final.json").exists()
    code = main(["train", "--dataset", "office_home", "--method", "erm", "--out", str(tmp_path / "u"),
                 "--data-root", str(tmp_path), "--no-mlflow"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "office_home does not exist" in err and len(err.splitlines()) == 1

"""WILDS datasets through the wilds package, on tiny fakes the tests write in wilds 2.0.0's exact on-disk formats.

Each builder writes ``<root>/<name>_v<version>/`` with its RELEASE file, the metadata files wilds reads (the
columns and encodings of the real releases) and tiny images or texts, then the tests run the datasets through
train -> evaluate -> report and check the records against numbers computed by hand from the predictions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from shiftbench.cli import main
from shiftbench.config import TrialSpec
from shiftbench.errors import UserError
from shiftbench.registry import DATASETS
from shiftbench.trainer import RunOptions, run_trial

IDENTITIES = ["male", "female", "LGBTQ", "christian", "muslim", "other_religions", "black", "white"]
AUXILIARY = ["identity_any", "severe_toxicity", "obscene", "threat", "insult", "identity_attack", "sexual_explicit"]
REGIONS = {"CHN": "Asia", "FRA": "Europe", "KEN": "Africa", "BRA": "Americas", "AUS": "Oceania"}



def _image(path: Path, label: int, shade: int) -> None:
    """An 8x8 image whose red channel shows the label (learnable) and green channel a nuisance attribute."""
    a = np.zeros((8, 8, 3), np.uint8)
    a[..., 0], a[..., 1], a[..., 2] = 40 + 170 * label, 60 + 120 * shade, 90
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def _release(folder: Path, version: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"RELEASE_v{version}.txt").write_text(f"v{version}\n")


def make_waterbirds(root: Path, n: int = 48) -> Path:
    """metadata.csv (img_id, img_filename, y, split, place, place_filename); splits 0/1/2; every group in each."""
    d = root / "waterbirds_v1.0"
    _release(d, "1.0")
    rows = []
    for i in range(n):
        y, place, split = i % 2, (i // 2) % 2, (i // 4) % 3
        fn = f"{'{:03d}'.format(i)}.Bird/img_{i}.jpg"
        _image(d / fn, y, place)
        rows.append({"img_id": i, "img_filename": fn, "y": y, "split": split, "place": place,
                     "place_filename": f"/x/place_{place}.jpg"})  # fmt: skip
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    return d


def make_celeba(root: Path, n: int = 48) -> Path:
    """list_attr_celeba.csv (image_id and -1/1 attributes), list_eval_partition.csv, img_align_celeba/*.jpg."""
    d = root / "celebA_v1.0"
    _release(d, "1.0")
    attrs, parts = [], []
    for i in range(n):
        blond, male = i % 2, (i // 2) % 2
        name = f"{i + 1:06d}.jpg"
        _image(d / "img_align_celeba" / name, blond, male)
        attrs.append({"image_id": name, "Smiling": 1, "Blond_Hair": 2 * blond - 1, "Male": 2 * male - 1})
        parts.append({"image_id": name, "partition": (i // 4) % 3})
    pd.DataFrame(attrs).to_csv(d / "list_attr_celeba.csv", index=False)
    pd.DataFrame(parts).to_csv(d / "list_eval_partition.csv", index=False)
    return d


def make_camelyon17(root: Path, per_center: int = 8) -> Path:
    """metadata.csv (index column, patient as zero-padded text, node, coordinates, tumor, slide, center, split) and
    patches/patient_P_node_N/patch_patient_P_node_N_x_X_y_Y.png; centres 1 and 2 become val and test."""
    d = root / "camelyon17_v1.0"
    _release(d, "1.0")
    rows = []
    for center in range(5):
        for j in range(per_center):
            patient, node, x, y, tumor = f"{center * 10 + j % 2:03d}", j % 2, 100 * j, 7, j % 2
            _image(d / f"patches/patient_{patient}_node_{node}/patch_patient_{patient}_node_{node}_x_{x}_y_{y}.png",
                   tumor, center % 2)  # fmt: skip
            rows.append({"patient": patient, "node": node, "x_coord": x, "y_coord": y, "tumor": tumor,
                         "slide": 2 * center + j % 2, "center": center, "split": int(j >= per_center - 2)})
    pd.DataFrame(rows).to_csv(d / "metadata.csv")
    return d


def make_civilcomments(root: Path, n: int = 48) -> Path:
    """all_data_with_identities.csv (index column, comment_text, split as text, toxicity, identity and auxiliary
    scores in [0, 1]); every identity x label group occurs in every split."""
    d = root / "civilcomments_v1.0"
    _release(d, "1.0")
    rows = []
    for i in range(n):
        y, parity = i % 2, (i // 2) % 2
        text = ("you are a stupid idiot " if y else "thanks for the kind words ") + f"comment {i}"
        row = {"id": i, "comment_text": text, "split": ["train", "val", "test"][(i // 4) % 3], "toxicity": 0.8 * y}
        row.update({k: float((parity + j) % 2 == 0) for j, k in enumerate(IDENTITIES)})
        row.update({k: 0.0 for k in AUXILIARY})
        rows.append(row)
    pd.DataFrame(rows).to_csv(d / "all_data_with_identities.csv")
    return d


def make_iwildcam(root: Path, n: int = 40) -> Path:
    """metadata.csv (split names incl. id_val/id_test, filename, y, location/sequence remapped to 0..k-1, datetime
    with microseconds); the images live in train/."""
    d = root / "iwildcam_v2.0"
    _release(d, "2.0")
    rows = []
    for i in range(n):
        y, split = i % 3, ["train", "val", "test", "id_val", "id_test"][(i // 3) % 5]
        fn = f"{i:04x}.jpg"
        _image(d / "train" / fn, y % 2, y // 2)
        rows.append({"split": split, "filename": fn, "y": y, "location_remapped": i % 4, "sequence_remapped": i,
                     "datetime": f"2013-06-{1 + i % 9:02d} 12:{i % 60:02d}:00.000", "image_id": f"im{i}"})
    pd.DataFrame(rows).to_csv(d / "metadata.csv", index=False)
    return d


def make_fmow(root: Path) -> Path:
    """rgb_metadata.csv (split incl. sequestered 'seq' rows, country_code, ISO timestamp, category) and
    country_code_mapping.csv; images/rgb_img_<row>.png are numbered over all rows, sequestered ones included."""
    d = root / "fmow_v1.1"
    _release(d, "1.1")
    rows = []
    codes = [*REGIONS, "ATA"]  # ATA is in no mapped region: WILDS' "Other"
    kinds = [("seq", "2011"), ("train", "2010"), ("train", "2011"), ("train", "2012"), ("val", "2011"),
             ("test", "2012"), ("val", "2014"), ("test", "2016")]  # fmt: skip
    for code in codes:
        for k, (split, year) in enumerate(kinds):
            label = k % 2
            rows.append({"split": split, "img_filename": f"x_{len(rows)}.jpg", "country_code": code,
                         "timestamp": f"{year}-0{1 + k % 8}-15T10:00:00Z", "category": ["airport", "barn"][label]})
            _image(d / "images" / f"rgb_img_{len(rows) - 1}.png", label, codes.index(code) % 2)
    pd.DataFrame(rows).to_csv(d / "rgb_metadata.csv", index=False)
    pd.DataFrame([{"name": c, "alpha-3": c, "region": r} for c, r in REGIONS.items()]).to_csv(
        d / "country_code_mapping.csv", index=False)
    return d


BUILDERS = {"waterbirds": make_waterbirds, "celeba": make_celeba, "camelyon17": make_camelyon17,
            "civilcomments": make_civilcomments, "iwildcam": make_iwildcam, "fmow": make_fmow}  # fmt: skip
TRAIN_ENVS = {
    "waterbirds": ["background:land, y:landbird", "background:land, y:waterbird", "background:water, y:landbird",
                   "background:water, y:waterbird"],
    "celeba": ["male:0, y:not blond", "male:0, y:blond", "male:1, y:not blond", "male:1, y:blond"],
    "camelyon17": ["hospital:0", "hospital:3", "hospital:4"],
    "civilcomments": ["black:0, y:0", "black:0, y:1", "black:1, y:0", "black:1, y:1"],
    "iwildcam": ["train"],
    "fmow": [f"region:{r}" for r in ("Asia", "Europe", "Africa", "Americas", "Oceania", "Other")],
}  # fmt: skip
FAST = {"resolution": 8, "encoder": "hashing:64,32,0"}


def _options(name: str) -> dict:
    return {k: v for k, v in FAST.items() if k != "encoder" or name == "civilcomments"}


def _predictions(trial: Path, split: str) -> dict[str, np.ndarray]:
    p = np.load(trial / "predictions.npz")
    sel = p["split"] == split
    return {k: p[k][sel] for k in p.files}


WORST_GROUPS = {"waterbirds": [("background", "y")], "celeba": [("male", "y")], "camelyon17": [("slide",)],
                "civilcomments": [(identity, "y") for identity in IDENTITIES], "fmow": [("region",)]}
"""The groups behind WILDS' worst-group numbers (its datasets' ``eval``): every combination of these metadata fields
present in the split; for CivilComments only the groups where the identity is present, for FMoW every region but
"Other"."""


def _worst_group(wds, name: str, p: dict[str, np.ndarray]) -> float:
    """The lowest accuracy over a split's groups, from its predictions and the rows' metadata alone."""
    meta, fields = wds.metadata_array[p["idx"]].numpy(), list(wds.metadata_fields)
    other = list(getattr(wds, "metadata_map", {}).get("region", [])).index("Other") if name == "fmow" else None
    accs = []
    for group_fields in WORST_GROUPS[name]:
        cols = meta[:, [fields.index(f) for f in group_fields]]
        for key in np.unique(cols, axis=0):
            if (name == "civilcomments" and key[0] != 1) or (name == "fmow" and key[0] == other):
                continue
            accs.append(float(p["correct"][(cols == key).all(1)].mean()))
    return min(accs)


@pytest.mark.parametrize("name", list(WORST_GROUPS))
def test_worst_group_accuracy_of_chosen_predictions_by_hand(name, tmp_path):
    """The dataset's own evaluation on predictions chosen here: right everywhere except every other row of its largest
    group, so that group's accuracy (and, its groups being disjoint, the worst) is 1 - wrong / its size."""
    root = tmp_path / "data"
    BUILDERS[name](root)
    ds = DATASETS.get(f"wilds:{name}")(str(root), _options(name))
    wds = ds.wds
    idx = np.flatnonzero(np.asarray(wds.split_array) == wds.split_dict["test"])
    y = wds.y_array[idx].numpy()
    meta, fields = wds.metadata_array[idx].numpy(), list(wds.metadata_fields)
    cols = meta[:, [fields.index(f) for f in WORST_GROUPS[name][0]]]
    other = list(getattr(wds, "metadata_map", {}).get("region", [])).index("Other") if name == "fmow" else None
    keys = [k for k in np.unique(cols, axis=0) if (name != "civilcomments" or k[0] == 1) and k[0] != other]
    rows = max((np.flatnonzero((cols == k).all(1)) for k in keys), key=len)  # the largest group
    wrong = rows[::2]
    pred = y.copy()
    pred[wrong] = y[wrong] + 1  # any other class is wrong
    correct = (pred == y).astype(np.float32)
    m = ds.evaluate("env0_in", {"idx": idx, "pred": pred, "correct": correct, "loss": np.zeros(len(idx), np.float32)})
    assert m["acc"] == pytest.approx(1 - len(wrong) / len(idx))
    assert m["worst_group_acc"] == pytest.approx(_worst_group(wds, name, {"idx": idx, "correct": correct}))
    if name != "civilcomments":  # CivilComments' identity groups overlap: only the recomputation above applies
        assert m["worst_group_acc"] == pytest.approx(1 - len(wrong) / len(rows))  # FMoW: one test row per region


@pytest.mark.parametrize("name", list(BUILDERS))
def test_trial_records_the_datasets_own_evaluation(name, tmp_path):
    root = tmp_path / "data"
    BUILDERS[name](root)
    spec = TrialSpec.resolve(f"wilds:{name}", "erm", steps=4, eval_every=2, model="mlp",
                             dataset_options=_options(name), hparams={"batch_size": 4})  # fmt: skip
    final = run_trial(spec, tmp_path / "t", RunOptions(data_root=str(root)))
    assert final["status"] == "done", final
    meta = json.loads((tmp_path / "t" / "spec.json").read_text())
    assert meta["env_names"] == ["test", *TRAIN_ENVS[name]] and meta["train_envs"] == TRAIN_ENVS[name]
    assert meta["dataset"]["validation_split"] == "env0_out"
    rec = final["record"]
    test = _predictions(tmp_path / "t", "env0_in")
    assert rec["env0_in_acc"] == pytest.approx(test["correct"].mean())
    wds = DATASETS.get(f"wilds:{name}")(str(root), _options(name)).wds
    assert len(test["idx"]) == int((np.asarray(wds.split_array) == wds.split_dict["test"]).sum())
    if name == "iwildcam":  # no groups: WILDS reports macro recall and F1 (sklearn's, over the labels present)
        from sklearn.metrics import f1_score

        labels = np.unique(test["label"])
        assert rec["env0_in_F1-macro_all"] == pytest.approx(f1_score(test["label"], test["pred"], average="macro",
                                                                     labels=labels))  # fmt: skip
        assert "env0_in_worst_group_acc" not in rec and "id_test_acc" in rec
    else:  # recomputed from the predictions and the rows' metadata, grouped as WILDS' evaluators group them
        for split in ("env0_in", "env0_out"):
            p = _predictions(tmp_path / "t", split)
            assert rec[f"{split}_worst_group_acc"] == pytest.approx(_worst_group(wds, name, p), abs=1e-6), split
    # ... and on to the leaderboard: the oracle reports the last checkpoint's official test accuracy
    from shiftbench.report import scan_runs, write_report

    metrics = write_report(scan_runs(tmp_path / "t").done, tmp_path / "rep", plots=False)
    rules = metrics["datasets"][f"wilds:{name}"]["rules"]
    assert rules["oracle"]["methods"]["erm"]["env0"]["mean"] == pytest.approx(100 * rec["env0_in_acc"])
    wg = rules["worst_group"]["methods"]["erm"]["env0"]["mean"]
    assert (wg is None) if name == "iwildcam" else (0 <= wg <= 100)


def test_waterbirds_worst_group_and_adjusted_average_by_hand(tmp_path):
    root = tmp_path / "data"
    make_waterbirds(root)
    meta = pd.read_csv(root / "waterbirds_v1.0" / "metadata.csv")
    spec = TrialSpec.resolve("wilds:waterbirds", "groupdro", steps=4, eval_every=2, model="mlp",
                             dataset_options=FAST, hparams={"batch_size": 4})  # fmt: skip
    rec = run_trial(spec, tmp_path / "t", RunOptions(data_root=str(root)))["record"]
    p = _predictions(tmp_path / "t", "env0_in")
    rows = meta.iloc[p["idx"]]
    assert (rows["split"] == 2).all() and (rows["y"].to_numpy() == p["label"]).all()
    acc = {(bg, y): p["correct"][((rows["place"] == bg) & (rows["y"] == y)).to_numpy()].mean()
           for bg in (0, 1) for y in (0, 1)}  # fmt: skip
    assert rec["env0_in_worst_group_acc"] == pytest.approx(min(acc.values()))
    # WILDS' adjusted average weights the groups by their training-set sizes (3498, 184, 56, 1057)
    adj = (acc[0, 0] * 3498 + acc[1, 0] * 184 + acc[0, 1] * 56 + acc[1, 1] * 1057) / (3498 + 184 + 56 + 1057)
    assert rec["env0_in_adj_acc_avg"] == pytest.approx(adj)


def test_fmow_worst_region_skips_sequestered_rows_and_other(tmp_path):
    root = tmp_path / "data"
    make_fmow(root)
    meta = pd.read_csv(root / "fmow_v1.1" / "rgb_metadata.csv")
    kept = meta[meta["split"] != "seq"].reset_index(drop=True)  # wilds drops sequestered rows, keeps numbering
    ds = DATASETS.get("wilds:fmow")(str(root), FAST)
    assert [Path(p).name for p in ds._paths] == [f"rgb_img_{i}.png" for i in meta.index[meta["split"] != "seq"]]
    spec = TrialSpec.resolve("wilds:fmow", "erm", steps=2, eval_every=1, model="mlp", dataset_options=FAST,
                             hparams={"batch_size": 4})  # fmt: skip
    rec = run_trial(spec, tmp_path / "t", RunOptions(data_root=str(root)))["record"]
    p = _predictions(tmp_path / "t", "env0_in")
    region = kept["country_code"].map(REGIONS).fillna("Other").to_numpy()[p["idx"]]
    per_region = [p["correct"][region == r].mean() for r in set(REGIONS.values())]
    assert rec["env0_in_worst_group_acc"] == pytest.approx(min(per_region))  # "Other" is not a region WILDS ranks


def test_training_streams_are_the_train_split_groups(tmp_path):
    root = tmp_path / "data"
    make_camelyon17(root)
    meta = pd.read_csv(root / "camelyon17_v1.0" / "metadata.csv", index_col=0)
    ds = DATASETS.get("wilds:camelyon17")(str(root), FAST)
    streams = ds.train_splits((0,))
    assert [n for n, _ in streams] == ["hospital:0", "hospital:3", "hospital:4"]
    for (name, split), center in zip(streams, (0, 3, 4)):
        rows = meta.iloc[split.tensors["idx"].numpy()]
        assert (rows["center"] == center).all() and (rows["split"] == 0).all()
        assert len(rows) == int(((meta["center"] == center) & (meta["split"] == 0)).sum())
    out = ds.environments[1].splits["out"].tensors["idx"].numpy()  # id_val of hospital 0
    assert (meta.iloc[out]["split"] == 1).all() and (meta.iloc[out]["center"] == 0).all()
    # the official test / val splits are the hospitals WILDS holds out: 2 and 1
    assert set(meta.iloc[ds.environments[0].splits["in"].tensors["idx"].numpy()]["center"]) == {2}
    assert set(meta.iloc[ds.environments[0].splits["out"].tensors["idx"].numpy()]["center"]) == {1}
    batch = streams[0][1].batch_at(3, 4, seed=7)
    again = streams[0][1].batch_at(3, 4, seed=7)
    assert batch["x"].shape == (4, 3, 8, 8) and torch.equal(batch["x"], again["x"])


# ------------------------------------------------------------------------------------------------ wilds' traps


def test_torch_scatter_stand_in_matches_a_hand_computed_group_mean():
    from shiftbench.datasets.wilds_data import scatter

    v = torch.tensor([1.0, 2.0, 3.0, 5.0])
    g = torch.tensor([0, 2, 2, 0])
    assert scatter(v, g, dim_size=4, reduce="mean").tolist() == [3.0, 0.0, 2.5, 0.0]
    assert scatter(v, g, dim_size=3, reduce="sum").tolist() == [6.0, 0.0, 5.0]


def test_import_wilds_starts_no_version_check_and_supplies_torch_scatter():
    # An ``outdated`` whose PyPI check would hang stands in for the real one (which fails fast here only because
    # pkg_resources is gone): wilds.version must never call it, and the caller's module comes back afterwards.
    code = ("import sys, threading, time, types\n"
            "fake = types.ModuleType('outdated')\n"
            "fake.check_outdated = lambda *a: time.sleep(60)\n"
            "sys.modules['outdated'] = fake\n"
            "from shiftbench.datasets.wilds_data import import_wilds\n"
            "import_wilds()\n"
            "from wilds.common.utils import avg_over_groups\n"
            "import torch\n"
            "m, c = avg_over_groups(torch.tensor([1., 3., 4.]), torch.tensor([1, 1, 0]), 3)\n"
            "print(len(threading.enumerate()), sys.modules['outdated'] is fake, m.tolist(), c.tolist())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"PYTHONSAFEPATH": "1", "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "True", "[4.0,", "2.0,", "0.0]", "[1.0,", "2.0,", "0.0]"]


def test_civilcomments_split_column_survives_pandas_string_dtype(tmp_path):
    make_civilcomments(tmp_path)
    ds = DATASETS.get("wilds:civilcomments")(str(tmp_path), {"encoder": "hashing:64,32,0"})
    assert sorted(set(np.asarray(ds.wds.split_array).tolist())) == [0, 1, 2]
    assert ds.input_shape == (96,)


# ------------------------------------------------------------------------------------- bad data: one clear line


@pytest.fixture
def waterbirds_sweep_args(tmp_path):
    """A sweep over the waterbirds fake with a tiny MLP (the suite file sets model and options)."""
    suite = tmp_path / "suite.yaml"
    suite.write_text("datasets: [wilds:waterbirds]\nmethods: [erm]\nsteps: 3\neval_every: 2\nmodel: mlp\n"
                     "test_envs: default\nhparams: {batch_size: 4}\n"
                     "dataset_options: {wilds:waterbirds: {resolution: 8}}\n")  # fmt: skip
    return suite


def _run_suite(capsys, suite: Path, root: Path, out: Path, mlflow: bool = False) -> tuple[int, list[str]]:
    argv = ["sweep", "--suite", str(suite), "--out", str(out), "--data-root", str(root), "--no-progress"]
    code = main(argv + ([] if mlflow else ["--no-mlflow"]))
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.startswith("shiftbench")]


def _finished(out: Path) -> list[Path]:
    return list(out.glob("trials/*/final.json"))


@pytest.mark.parametrize("damage, expected", [
    ("release", ["RELEASE_v1.0.txt", "RELEASE_v2.0.txt"]),
    ("column", ["metadata.csv", "place"]),
    ("truncated", ["cannot decode image", "img_10.jpg"]),
])  # fmt: skip
def test_bad_data_gets_one_line_naming_the_file(damage, expected, waterbirds_sweep_args, capsys, tmp_path):
    root = tmp_path / "data"
    d = make_waterbirds(root)
    if damage == "release":
        (d / "RELEASE_v1.0.txt").rename(d / "RELEASE_v2.0.txt")
    elif damage == "column":
        pd.read_csv(d / "metadata.csv").drop(columns=["place"]).to_csv(d / "metadata.csv", index=False)
    else:  # a test-split image (rows 8-11 are the first test block): read at the first evaluation
        target = d / "010.Bird" / "img_10.jpg"
        target.write_bytes(target.read_bytes()[:60])
    code, lines = _run_suite(capsys, waterbirds_sweep_args, root, tmp_path / "runs")
    assert code == 2 and len(lines) == 1, lines
    assert all(e in lines[0] for e in expected), lines[0]
    assert not _finished(tmp_path / "runs")


def test_prepared_data_is_verified_against_its_manifest(waterbirds_sweep_args, capsys, tmp_path):
    src = tmp_path / "src"
    make_waterbirds(src)
    assert main(["prepare", "--params", str(waterbirds_sweep_args), "--out", str(tmp_path / "data"),
                 "--data-root", str(src)]) == 0  # fmt: skip
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    assert manifest["files"]["waterbirds_v1.0/metadata.csv"] == __import__("hashlib").sha256(
        (src / "waterbirds_v1.0" / "metadata.csv").read_bytes()).hexdigest()
    code, _ = _run_suite(capsys, waterbirds_sweep_args, tmp_path / "data", tmp_path / "ok")
    assert code == 0 and len(_finished(tmp_path / "ok")) == 1
    victim = tmp_path / "data" / "waterbirds_v1.0" / "metadata.csv"
    victim.unlink()  # prepared files may be hard links to the source: replace, never edit in place
    victim.write_text((src / "waterbirds_v1.0" / "metadata.csv").read_text().replace("place_0", "place_9"))
    code, lines = _run_suite(capsys, waterbirds_sweep_args, tmp_path / "data", tmp_path / "bad")
    assert code == 2 and len(lines) == 1 and "metadata.csv does not match" in lines[0] and "manifest" in lines[0]
    assert not _finished(tmp_path / "bad")
    assert main(["prepare", "--check", "--out", str(tmp_path / "data")]) == 2
    assert "metadata.csv does not match" in capsys.readouterr().err


# --------------------------------------------------------------------------- versions, MLflow, leaderboard


def test_dvc_md5_joins_the_data_version(tmp_path):
    from shiftbench.datasets.image_folder import dvc_md5

    make_waterbirds(tmp_path / "data")
    plain = DATASETS.get("wilds:waterbirds")(str(tmp_path / "data"), FAST).version()
    assert len(plain) == 64 and dvc_md5(tmp_path / "data") is None
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    cmd: x\n    outs:\n    - path: data\n"
                                       "      md5: 0123abcd.dir\n      size: 1\n")  # fmt: skip
    tracked = DATASETS.get("wilds:waterbirds")(str(tmp_path / "data"), FAST).version()
    assert tracked == plain + "+dvc:0123abcd.dir"


@pytest.mark.slow
def test_sweep_to_mlflow_and_worst_group_leaderboard(waterbirds_sweep_args, capsys, tmp_path):
    from mlflow import MlflowClient

    root = tmp_path / "data"
    make_waterbirds(root)
    code, _ = _run_suite(capsys, waterbirds_sweep_args, root, tmp_path / "runs", mlflow=True)
    assert code == 0
    trial = next((tmp_path / "runs" / "trials").iterdir())
    meta = json.loads((trial / "spec.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"tags.`shiftbench.trial_hash` = '{meta['hash']}'")  # fmt: skip
    (run,) = runs
    assert run.inputs.dataset_inputs[0].dataset.digest == meta["data_version"][:36]
    assert "env0_out_worst_group_acc" in run.data.metrics

    assert main(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    metrics = json.loads((tmp_path / "rep" / "report.json").read_text())
    cell = metrics["datasets"]["wilds:waterbirds"]["rules"]["worst_group"]["methods"]["erm"]["env0"]
    records = [json.loads(x) for x in (trial / "results.jsonl").read_text().splitlines()]
    best = max(records, key=lambda r: (r["env0_out_worst_group_acc"], -r["step"]))  # first of the best
    assert cell["name"] == "test" and cell["mean"] == pytest.approx(100 * best["env0_in_worst_group_acc"])
    assert "## wilds:waterbirds — worst-group validation" in (tmp_path / "rep" / "leaderboard.md").read_text()


def test_unknown_grouping_and_missing_root_are_one_line(capsys, tmp_path):
    with pytest.raises(UserError, match="cannot group by location"):
        TrialSpec.resolve("wilds:iwildcam", "erm", dataset_options={"groupby": "location"})
    with pytest.raises(UserError, match="did you mean 'wilds:waterbirds'"):
        DATASETS.get("wilds:waterbird")
    code = main(["train", "--dataset", "wilds:celeba", "--method", "erm", "--out", str(tmp_path / "t"),
                 "--data-root", str(tmp_path / "nothing"), "--no-mlflow"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "celebA_v1.0" in err and "RELEASE_v1.0.txt" in err


# ------------------------------------------------------------------------------------- the worst_group rule


def _trial(h: str, draw: int, records: list[dict], dataset: dict | None = None) -> dict:
    return {"hash": h, "spec": {"test_envs": [2 if dataset is None else 0], "hparams_seed": draw, "seed": 0},
            "records": records, "dataset": dataset}  # fmt: skip


def test_worst_group_rule_uses_the_named_validation_split():
    from shiftbench.selection import training_domain, worst_group

    wilds = {"validation_split": "env0_out"}
    a = _trial("a", 0, [{"step": 0, "env0_out_worst_group_acc": 0.2, "env0_in_worst_group_acc": 0.30, "env0_in_acc": .9,
                         "env1_out_acc": 0.9},
                        {"step": 5, "env0_out_worst_group_acc": 0.6, "env0_in_worst_group_acc": 0.55, "env0_in_acc": .8,
                         "env1_out_acc": 0.7}], wilds)  # fmt: skip
    b = _trial("b", 1, [{"step": 5, "env0_out_worst_group_acc": 0.5, "env0_in_worst_group_acc": 0.70, "env0_in_acc": .7,
                         "env1_out_acc": 0.95}], wilds)  # fmt: skip
    s = worst_group([a, b], 0)
    assert (s.hash, s.step, s.val_acc, s.test_acc) == ("a", 5, 0.6, 0.55)
    t = training_domain([a, b], 0)  # average validation accuracy prefers the other draw
    assert (t.hash, t.test_acc) == ("b", 0.7)


def test_worst_group_rule_without_groups_takes_the_worst_training_environment():
    from shiftbench.selection import training_domain, worst_group

    recs = [{"step": 0, "env0_out_acc": 0.95, "env1_out_acc": 0.55, "env2_in_acc": 0.40},   # mean 0.75, worst 0.55
            {"step": 1, "env0_out_acc": 0.70, "env1_out_acc": 0.70, "env2_in_acc": 0.65}]   # mean 0.70, worst 0.70
    trial = _trial("c", 0, recs)
    assert worst_group([trial], 2).step == 1 and worst_group([trial], 2).test_acc == 0.65
    assert training_domain([trial], 2).step == 0
    assert worst_group([trial], 1) is None  # no trial holds out env 1

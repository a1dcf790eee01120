"""One settings mechanism: dataset options and callback settings declared as ``Setting`` and checked by one function.

The trial hashes and resolved defaults below were computed at commit d4a85e3, before options became Settings (the
plain-dict ``OPTIONS`` and the hand-written checks): the declarations must resolve to the same plain values.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shiftbench import catalog
from shiftbench.callbacks import Callback
from shiftbench.config import TrialSpec, canonical_json
from shiftbench.errors import UserError
from shiftbench.hparams import POSITIVE, HParam, Rule, between, fixed
from shiftbench.hparams import validate as validate_hparam
from shiftbench.registry import CALLBACKS, DATASETS
from shiftbench.settings import Setting, as_settings, resolve, shown, with_defaults

DECL = {
    "size": Setting(4000, "examples", POSITIVE),
    "rate": Setting(0.5, "a share", between(0, 1)),
    "flag": Setting(False, "a switch"),
    "mode": Setting("a", "which", choices=("a", "b")),
    "step": Setting(None, "a step (none: automatic)", POSITIVE, type=float),
}


def refusal(given) -> str:
    with pytest.raises(UserError) as e:
        resolve(DECL, given, "dataset toy")
    return str(e.value)


def test_defaults_and_strings_read_as_the_defaults_type():
    assert resolve(DECL, {}, "dataset toy") == {"size": 4000, "rate": 0.5, "flag": False, "mode": "a", "step": None}
    got = resolve(DECL, {"size": "300", "rate": "0.25", "flag": "yes", "mode": "b", "step": "0.01"}, "dataset toy")
    assert got == {"size": 300, "rate": 0.25, "flag": True, "mode": "b", "step": 0.01}
    assert type(got["size"]) is int and type(got["rate"]) is float
    assert resolve(DECL, {"size": 12.0, "step": "none"}, "x")["size"] == 12 and resolve(DECL, {"step": "none"}, "x")[
        "step"] is None  # fmt: skip


def test_refusals_are_one_line_each_with_what_and_the_default():
    assert refusal({"sise": 3}) == ("dataset toy: bad option 'sise=3' (did you mean 'size'?): unknown option 'sise'; "
                                    "known: flag, mode, rate, size, step")
    assert refusal({"colour": 1}) == ("dataset toy: bad option 'colour=1': unknown option 'colour'; "
                                      "known: flag, mode, rate, size, step")
    assert refusal({"size": -3}) == "dataset toy: option size=-3 must be > 0 (default 4000)"
    assert refusal({"size": "many"}) == "dataset toy: option size='many' is not an integer"
    assert refusal({"size": 2.5}) == "dataset toy: option size=2.5 must be a whole number (default 4000)"
    assert refusal({"size": True}) == "dataset toy: option size=True must be a number (default 4000)"
    assert refusal({"rate": float("nan")}) == "dataset toy: option rate=nan must be a finite number (default 0.5)"
    assert refusal({"rate": 1.5}) == "dataset toy: option rate=1.5 must be between 0 and 1 (default 0.5)"
    assert refusal({"flag": "maybe"}) == "dataset toy: option flag='maybe' is not true or false"
    assert refusal({"flag": 1}) == "dataset toy: option flag=1 must be true or false (default False)"
    assert refusal({"mode": "c"}) == "dataset toy: option mode='c' must be one of a, b (default 'a')"
    assert refusal({"mode": 3}) == "dataset toy: option mode=3 must be text (default 'a')"
    assert refusal({"step": "-1"}) == "dataset toy: option step=-1.0 must be > 0 (default None)"


def test_hyperparameters_and_settings_share_one_validator():
    rule = Rule("a multiple of 4", lambda v: v % 4 == 0)
    with pytest.raises(UserError) as hp:
        validate_hparam("width", 6, HParam(8, fixed(8), rule))
    with pytest.raises(UserError) as opt:
        resolve({"width": Setting(8, "w", rule)}, {"width": 6}, "dataset toy")
    assert str(hp.value) == "hyperparameter width=6 must be a multiple of 4 (default 8)"
    assert str(opt.value) == "dataset toy: option width=6 must be a multiple of 4 (default 8)"


def test_plain_defaults_and_overridden_defaults():
    assert as_settings({"n": 300}) == {"n": Setting(300, "")}
    assert resolve({"n": 300}, {"n": "7"}, "x") == {"n": 7}  # an external plug-in's plain OPTIONS still resolve
    d = with_defaults(DECL, size=10)
    assert d["size"].default == 10 and d["size"].help == "examples" and DECL["size"].default == 4000
    with pytest.raises(KeyError):
        with_defaults(DECL, sizes=10)
    with pytest.raises(TypeError):
        Setting(None, "no type")
    assert [shown(v) for v in (True, False, "", "x", 0.2, 4000, None)] == ["true", "false", "''", "x", "0.2", "4000",
                                                                           "none"]  # fmt: skip


def test_a_dataset_option_refused_at_resolve():
    cls = DATASETS.get("colored_digits")
    with pytest.raises(UserError) as e:
        cls.resolve_options({"env_size": -3})
    assert str(e.value) == "dataset colored_digits: option env_size=-3 must be > 0 (default 4000)"
    with pytest.raises(UserError) as e:  # a cross-option check, in check_options: 2 examples at 20% leave no 'out'
        cls.resolve_options({"env_size": "2"})
    assert str(e.value) == ("dataset colored_digits: option env_size=2 must be large enough for one 'in' and one "
                            "'out' example (holdout_fraction 0.2)")
    with pytest.raises(UserError, match="^dataset rendezvous: option size=2 must be >= 3 \\(default 5\\)$"):
        DATASETS.get("rendezvous").resolve_options({"size": 2})


@pytest.mark.parametrize("name", DATASETS.names())
def test_every_dataset_declares_its_options_as_settings_with_help(name):
    cls = DATASETS.get(name)
    assert cls.OPTIONS, f"{name} declares no options"
    for key, s in cls.OPTIONS.items():
        assert isinstance(s, Setting), f"{name}: option {key} is a plain {type(s).__name__}, not a Setting"
        assert s.help.strip(), f"{name}: option {key} has no help"
        assert resolve({key: s}, {key: s.default}, name) == {key: s.default}  # its default meets its own checks


@pytest.mark.parametrize("name", CALLBACKS.names())
def test_every_callback_declares_its_settings(name):
    cls = CALLBACKS.get(name)
    for key, s in cls.SETTINGS.items():
        assert isinstance(s, Setting) and s.help.strip(), f"{name}: setting {key} is not a Setting with help"
    if cls.SETTINGS:  # settings are given as family:k=v, so the family name must resolve to this class
        family = name if name.endswith(":") else name + ":"
        assert CALLBACKS.get(family + "x=1") is not None
        assert cls.settings_of(family) == {k: s.default for k, s in cls.SETTINGS.items()}
    cls.validate(name.rstrip(":"))


def test_callback_settings_parsed_once_by_the_base_class():
    class Toy(Callback):
        SETTINGS = {"n": Setting(3, "how many", POSITIVE), "tag": Setting("t", "a name")}

    assert Toy.settings_of("toy") == {"n": 3, "tag": "t"}
    assert Toy.settings_of("toy:n=5, tag=x") == {"n": 5, "tag": "x"}
    for name, says in [("toy:n=0", "callback 'toy:n=0': setting n=0 must be > 0 (default 3)"),
                       ("toy:nn=1", "callback 'toy:nn=1': bad setting 'nn=1' (did you mean 'n'?): unknown setting "
                                    "'nn'; known: n, tag"),
                       ("toy:n", "callback 'toy:n': bad setting 'n'; write key=value with keys n, tag")]:  # fmt: skip
        with pytest.raises(UserError) as e:
            Toy.validate(name)
        assert str(e.value) == says
    from shiftbench.hooks.robust import RobustEval, parse_settings, resolve_threat

    threat = resolve_threat(parse_settings("robust_eval:eps=0.3,steps=10"))
    assert (threat.kind, threat.eps, threat.steps, threat.restarts, threat.random_start, threat.alpha) == (
        "linf", 0.3, 10, 2, True, 2.5 * 0.3 / 10)  # fmt: skip
    assert parse_settings("robust_eval:step_size=0.01")["step_size"] == 0.01
    with pytest.raises(UserError, match="^callback 'robust_eval:key=a-b': setting key='a-b' must be a plain name"):
        RobustEval.validate("robust_eval:key=a-b")


# Computed at d4a85e3 (plain-dict OPTIONS): sha256 of canonical_json(cls.resolve_options({})), first 16 hex digits.
RESOLVED_DEFAULTS_AT_D4A85E3 = {
    "colored_digits": "e58133a8b0635467", "colored_mnist": "ee315c579dc5438d", "cue_digits": "8679680c85f72999",
    "domain_net": "a837b7f414193eb4", "image_folder": "a837b7f414193eb4", "lever_game": "ea68751d6c03ea13",
    "office_home": "a837b7f414193eb4", "pacs": "a837b7f414193eb4", "preference_files": "a59fb07aa00f1069",
    "rendezvous": "63c9de235071bda3", "rotated_digits": "aa352aedf0712d36", "rotated_mnist": "2a754121005bf768",
    "spurious_prefs": "4e66a3ac12a5067c", "subpop_digits": "14436720a930a352", "terra_incognita": "a837b7f414193eb4",
    "vlcs": "a837b7f414193eb4", "wilds:camelyon17": "b9daaf827437b28c", "wilds:celeba": "0602ac2ea5a9d83d",
    "wilds:civilcomments": "d7fb152146e7e694", "wilds:fmow": "0065bee65f971fd2", "wilds:iwildcam": "b182a3d6056ac3f8",
    "wilds:waterbirds": "7d18056d524139a5",
}  # fmt: skip


def test_trial_hashes_and_resolved_options_are_those_before_settings():
    # hashes computed at d4a85e3 with these exact calls
    assert TrialSpec.resolve("colored_digits", "erm").hash == (
        "8fc46f52cc1b65d9bfc2c3b2ce71a4d4818e9130e36b242dec5d662d0254a643")
    opts = {"env_size": "300", "holdout_fraction": 0.25, "noise": "0.1"}
    assert TrialSpec.resolve("colored_digits", "erm", seed=2, dataset_options=opts).hash == (
        "0a59bdb5425e7faef0dad214d8341768f7aef466028893b49decc68c856699e9")
    assert TrialSpec.resolve("rotated_digits", "irm", dataset_options={"seed": 0, "resolution": 8}).hash == (
        "4a825f9474d4f04c000183acee6926f27f71f13d3a8065feb251692019fa120f")
    for name, digest in RESOLVED_DEFAULTS_AT_D4A85E3.items():
        got = hashlib.sha256(canonical_json(DATASETS.get(name).resolve_options({})).encode()).hexdigest()[:16]
        assert got == digest, f"{name}: resolved default options changed"


def test_the_catalog_holds_options_and_settings():
    live = catalog.build()
    digits = next(d for d in live["datasets"] if d["name"] == "colored_digits")
    row = next(r for r in digits["options"] if r["name"] == "env_size")
    assert row == {"name": "env_size", "default": "4000",
                   "help": "examples per environment, 'in' + 'out' (split in the holdout_fraction proportion)"}
    line = next(x for x in catalog.settings_lines(digits) if "env_size=" in x)
    assert line == "      env_size=4000              " + row["help"]
    robust = {c["name"]: c for c in live["callbacks"]}
    assert {r["name"] for r in robust["robust_eval:"]["settings"]} >= {"eps", "steps", "threat", "key", "examples"}
    assert robust["robust_eval"]["settings"] == [] and robust["drift"]["settings"] == []


def test_shiftbench_list_prints_options_with_default_and_help(tmp_path):
    exe = Path(sys.executable).with_name("shiftbench")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHONSAFEPATH="1")
    out = subprocess.run([str(exe), "list", "datasets"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    help_text = DATASETS.get("colored_digits").OPTIONS["label_noise"].help
    assert f"      label_noise=0.25           {help_text}" in out.stdout.splitlines()
    out = subprocess.run([str(exe), "list", "callbacks"], env=env, capture_output=True, text=True, timeout=300)
    assert any(x.split() == ["eps=0.1", "radius", "of", "the", "ε-ball", "(PGD)"] for x in out.stdout.splitlines())

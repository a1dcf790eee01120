"""What a newcomer reads: every option's help says its default, ``list`` prints whole descriptions from a catalog
that equals the live registries, and ``--help`` and ``list`` start without importing torch."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

from shiftbench import catalog
from shiftbench.cli import build_parser, main


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _leaf_parsers(parser, prefix="shiftbench"):
    yield prefix, parser
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for name, sub in a.choices.items():
                yield from _leaf_parsers(sub, f"{prefix} {name}")


def test_every_option_of_every_subcommand_has_help_that_states_its_default():
    missing = []
    for where, parser in _leaf_parsers(build_parser()):
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            text = parser.formatter_class(prog="x")._get_help_string(action) or ""
            flag = isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse._CountAction))
            if not text.strip():
                missing.append(f"{where} {action.option_strings[0]}: no help")
            elif not (flag or action.required or "default" in text.lower() or "required" in text):
                missing.append(f"{where} {action.option_strings[0]}: help does not say the default")
    assert not missing, "\n".join(missing)


def test_help_formatter_appends_a_default_that_help_does_not_state():
    from shiftbench.cliargs import Parser

    p = Parser(prog="x")
    p.add_argument("--workers", type=int, default=3, help="trials at once")
    p.add_argument("--device", default="auto", help="device (default: auto)")
    text = p.format_help()
    assert "trials at once (default: 3)" in text and "(default: auto) (default" not in text


def test_list_prints_each_description_whole(capsys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    from shiftbench.registry import METHODS

    doc = METHODS.get("irm").__doc__
    first_paragraph = " ".join(x.strip() for x in doc.strip().split("\n\n")[0].splitlines())
    line = next(x for x in out.splitlines() if x.strip().startswith("irm "))
    assert line.split(None, 1)[1] == first_paragraph and not line.endswith("…")


def test_catalog_equals_the_live_registries():
    from shiftbench.registry import CALLBACKS, DATASETS, METHODS, MODELS

    live = catalog.build()
    assert [m["name"] for m in live["methods"]] == METHODS.names()
    assert [d["name"] for d in live["datasets"]] == DATASETS.names()
    assert [m["name"] for m in live["models"]] == MODELS.names()
    assert [c["name"] for c in live["callbacks"]] == CALLBACKS.names()
    assert catalog.load() == json.loads(json.dumps(live))  # the cached copy is the same catalog


def test_catalog_cache_follows_a_source_edit(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = catalog.fingerprint()
    catalog.load()
    assert len(list((tmp_path / "shiftbench").glob("catalog-*.json"))) == 1
    src = catalog._source_roots()[0] / "errors.py"
    st = src.stat()
    try:
        import os

        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert catalog.fingerprint() != first  # an edited source is a new catalog, never the stale one
    finally:
        os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_drift_command_constants_match_the_drift_module():
    from shiftbench import drift
    from shiftbench.commands import drift as command

    assert tuple(drift.DETECTORS) == command.DETECTOR_NAMES and drift.ALPHA == command.ALPHA


@pytest.mark.parametrize("argv", [["--help"], ["list"], ["drift", "--help"], ["train", "--help"]])
def test_start_up_imports_no_torch(argv, cli_env, tmp_path):
    cli_env = dict(cli_env, XDG_CACHE_HOME=str(tmp_path))  # a catalog cache of its own
    code = ("import sys\nfrom shiftbench.cli import main\ntry:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n") % (argv,)
    subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True)  # warms the catalog cache
    out = subprocess.run([sys.executable, "-c", code], env=cli_env, capture_output=True, text=True)
    assert out.stderr.strip().splitlines()[-1] == "NO-TORCH", out.stderr

"""``edgesplit evaluate`` option parsing and errors (no training here; the real sweep through
the CLI is in test_sweep_digits.py)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from edgesplit.cli import evaluate as cli
from edgesplit.evaluate.sweep import DEFAULT_CODECS, SweepArgs


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgesplit")
    sub = parser.add_subparsers(dest="command")
    cli.add_parser(sub, argparse.ArgumentDefaultsHelpFormatter)
    return parser.parse_args(["evaluate", *argv])


def test_defaults_match_the_sweep_and_the_issue() -> None:
    args = _parse()
    sweep = cli.to_sweep_args(args)
    assert (
        sweep.codecs
        == list(DEFAULT_CODECS)
        == ["fp32", "fp16", "q8+zstd", "q4+zstd", "q2+zstd", "q1+zstd", "topk:0.1+q8+zstd"]
    )
    default = SweepArgs()
    for name in (
        "data",
        "config",
        "model",
        "grad_codec",
        "seeds",
        "epochs",
        "batch_size",
        "lr",
        "clients",
        "max_drop",
        "objective",
        "latency_mode",
        "out",
        "fl_clients",
        "server_device",
        "host_device",
    ):
        assert getattr(sweep, name) == getattr(default, name), name
    assert sweep.cuts is None and sweep.devices is None and sweep.links is None
    assert args.run is cli.run
    assert sweep.command.startswith("edgesplit evaluate --data digits")


def test_every_option_has_help_with_its_default() -> None:
    parser = argparse.ArgumentParser(prog="edgesplit")
    sub = parser.add_subparsers(dest="command")
    p = cli.add_parser(sub, argparse.ArgumentDefaultsHelpFormatter)
    for action in p._actions:
        if action.dest != "help":
            assert action.help, action.dest
    text = p.format_help()
    assert "(default: 1.0)" in text and "(default: digits)" in text


def test_options_reach_the_sweep() -> None:
    args = _parse(
        "--cuts",
        "relu1,relu2",
        "--codecs",
        "fp32;q4:channel,stochastic+zstd,q8",
        "--devices",
        "rpi4, rpi5",
        "--links",
        "lora",
        "--seeds",
        "1",
        "--max-drop",
        "2.5",
        "--objective",
        "bytes",
        "--latency-mode",
        "infer",
        "--compare-fl",
        "--fl-clients",
        "5,50",
        "--json",
    )
    s = cli.to_sweep_args(args)
    assert s.cuts == ["relu1", "relu2"]
    assert s.codecs == ["fp32", "q4:channel,stochastic+zstd", "q8"]
    assert s.devices == ["rpi4", "rpi5"] and s.links == ["lora"]
    assert (s.seeds, s.max_drop, s.objective, s.latency_mode) == (1, 2.5, "bytes", "infer")
    assert s.compare_fl and s.fl_clients == [5, 50]
    assert "--compare-fl" in s.command and "--max-drop 2.5" in s.command


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("fp32,fp16,q8+zstd", ["fp32", "fp16", "q8+zstd"]),
        (
            "topk:0.1+q8+zstd,q4:channel,stochastic+zstd",
            ["topk:0.1+q8+zstd", "q4:channel,stochastic+zstd"],
        ),
        ("q8:channel+zstd:3; q4", ["q8:channel+zstd:3", "q4"]),
        (" fp32 , , q2+zstd ", ["fp32", "q2+zstd"]),
        # a misspelt codec after one without parameters is a codec, refused by its own name
        ("fp32,q8+zstd,q5", ["fp32", "q8+zstd", "q5"]),
        ("q4+zstd/q4:stochastic,q8", ["q4+zstd/q4:stochastic", "q8"]),
        ("fq:2,ans,fp32", ["fq:2,ans", "fp32"]),
    ],
)
def test_split_codecs(text: str, want: list[str]) -> None:
    assert cli.split_codecs(text) == want


def test_split_cuts() -> None:
    assert cli.split_cuts("relu1,relu2") == ["relu1", "relu2"]
    assert cli.split_cuts("relu1,relu2;pool1,relu3") == ["relu1,relu2", "pool1,relu3"]
    assert cli.split_cuts("relu1,relu2", "ushape") == ["relu1,relu2"]  # one pair


@pytest.mark.parametrize(
    ("argv", "names"),
    [
        (["--codecs", "fp32,q8+zstd,q5"], ["--codecs entry 'q5'", "unknown codec stage 'q5'"]),
        (["--cuts", "relu9"], ["--cuts 'relu9'", "unknown cut 'relu9'", "relu1, fc2, relu2"]),
        (["--config", "ushape", "--cuts", "relu1,relu9"], ["unknown second cut 'relu9'"]),
    ],
)
def test_bad_codec_or_cut_is_refused_before_training(
    argv: list[str],
    names: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from edgesplit.cli.main import main
    from edgesplit.evaluate import sweep

    def no_training(spec: object) -> None:
        raise AssertionError(f"a cell started training: {spec}")

    monkeypatch.setattr(sweep, "default_train_fn", no_training)
    code = main(
        ["evaluate", "--data", "digits", *argv, "--out", str(tmp_path / "ev"), "--no-progress"]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err, err
    assert not (tmp_path / "ev" / ".cache").exists() or not any((tmp_path / "ev").rglob("*.json"))


def test_errors_are_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgesplit.cli.main import main

    code = main(
        [
            "evaluate",
            "--cuts",
            "relu1",
            "--devices",
            "toaster",
            "--out",
            str(tmp_path),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "unknown device 'toaster'" in err and "rpi4" in err
    assert main(["evaluate", "--fl-clients", "ten", "--out", str(tmp_path)]) == 2


def test_light_modules_import_without_torch() -> None:
    # the profile reader and the pure evaluation modules run where torch is absent
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['matplotlib'] = None\n"
        "import edgesplit.devices, edgesplit.evaluate.latency, edgesplit.evaluate.pareto\n"
        "import edgesplit.evaluate.recommend, edgesplit.evaluate.fl_compare\n"
        "import edgesplit.evaluate.sweep, edgesplit.evaluate.report, edgesplit.cli.evaluate\n"
        "print(edgesplit.devices.load_device('rpi4').name)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "rpi4"

"""Export recipes: the command line wins over a recipe, which wins over the defaults; a recipe
value of the wrong type or range is refused before any work starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgesplit.cli.export import TARGET_DEFAULTS, resolve_target
from edgesplit.cli.main import build_parser
from edgesplit.errors import ConfigError


def _resolved(*argv: str):
    args = build_parser().parse_args(["export", *argv])
    resolve_target(args)
    return args


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "target.toml"
    path.write_text('device = "jetson-nano"\nopset = 19\nfit_batch = 16\natol = 0.001\n')
    return path


def test_explicit_values_win_even_when_equal_to_the_default(recipe: Path) -> None:
    # 18 and 1 are what the old merge took for "not given" (opset's exporter default, fit_batch's)
    args = _resolved("--recipe", str(recipe), "--opset", "18", "--fit-batch", "1")
    assert (args.opset, args.fit_batch) == (18, 1)
    assert (args.device, args.atol) == ("jetson-nano", 0.001)   # not given: the recipe's


def test_recipe_fills_what_is_not_given_and_defaults_the_rest(recipe: Path) -> None:
    args = _resolved("--recipe", str(recipe))
    assert (args.device, args.opset, args.fit_batch, args.atol) == ("jetson-nano", 19, 16, 0.001)
    assert args.weights == TARGET_DEFAULTS["weights"] == "fp32"
    assert args.rtol == TARGET_DEFAULTS["rtol"] == 1e-4


def test_no_recipe_gives_the_documented_defaults() -> None:
    args = _resolved()
    assert {k: getattr(args, k) for k in TARGET_DEFAULTS} == TARGET_DEFAULTS


@pytest.mark.parametrize(("line", "message"), [
    ('fit_batch = "lots"', r"fit_batch must be an integer >= 1, got 'lots'"),
    ("fit_batch = 0", r"fit_batch must be an integer >= 1, got 0"),
    ("opset = 18.5", r"opset must be an integer >= 1, got 18.5"),
    ("calibration_samples = true", r"calibration_samples must be an integer >= 1, got True"),
    ("atol = -1.0", r"atol must be a number >= 0, got -1.0"),
    ("atol = nan", r"atol must be a number >= 0, got nan"),
    ('weights = "int4"', r"weights must be one of fp32, int8, got 'int4'"),
    ("device = 3", r"device must be a non-empty string, got 3"),
])
def test_bad_recipe_values_are_refused(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message):
        _resolved("--recipe", str(path))


def test_cli_refuses_a_bad_recipe_in_one_line_before_training(cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('fit_batch = "lots"\n')
    # no --from: a good recipe would train first; the refusal must come before that
    out = cli("export", "--recipe", str(path), "--out", str(tmp_path / "out"), timeout=60)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "fit_batch must be an integer >= 1, got 'lots'" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[2] / "export").glob("*.toml")),
                         ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path: Path) -> None:
    from edgesplit.cli.export import read_recipe

    assert read_recipe(path)["device"]

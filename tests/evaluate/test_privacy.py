"""The privacy metrics and attacks can fail: they find a planted leak and find none in noise."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from edgesplit.data import load_dataset
from edgesplit.errors import ConfigError
from edgesplit.evaluate import privacy
from edgesplit.evaluate.privacy_run import PrivacyOptions, invert, train_and_attack
from edgesplit.train.spec import TrainSpec


# ------------------------------------------------------------------------------ slow references
def _slow_dcor_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """Székely & Rizzo (2014), eq. (3.1)-(3.2), written out with loops."""
    n = len(x)

    def u_centred(v: np.ndarray) -> list[list[float]]:
        d = [[float(np.linalg.norm(v[i] - v[j])) for j in range(n)] for i in range(n)]
        row = [sum(r) for r in d]
        tot = sum(row)
        return [[0.0 if i == j else d[i][j] - row[i] / (n - 2) - row[j] / (n - 2)
                 + tot / ((n - 1) * (n - 2)) for j in range(n)] for i in range(n)]

    a, b = u_centred(x), u_centred(y)

    def inner(p: list[list[float]], q: list[list[float]]) -> float:
        return sum(p[i][j] * q[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 3))

    return inner(a, b) / math.sqrt(inner(a, a) * inner(b, b))


def _slow_dcor_biased(x: np.ndarray, y: np.ndarray) -> float:
    n = len(x)

    def centred(v: np.ndarray) -> np.ndarray:
        d = np.array([[np.linalg.norm(v[i] - v[j]) for j in range(n)] for i in range(n)])
        out = np.zeros_like(d)
        for i in range(n):
            for j in range(n):
                out[i, j] = d[i, j] - d[i].mean() - d[:, j].mean() + d.mean()
        return out

    a, b = centred(x), centred(y)
    return math.sqrt((a * b).mean() / math.sqrt((a * a).mean() * (b * b).mean()))


def _slow_auc(scores: np.ndarray, pos: np.ndarray) -> float:
    p, q = scores[pos], scores[~pos]
    wins = sum((a > b) + 0.5 * (a == b) for a in p for b in q)
    return wins / (len(p) * len(q))


# ------------------------------------------------------------------------------ dependence
@pytest.mark.parametrize("seed", [0, 1])
def test_dcor_matches_slow_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((23, 5))
    y = np.tanh(x @ rng.standard_normal((5, 3))) + 0.5 * rng.standard_normal((23, 3))
    assert privacy.dcor_unbiased(x, y) == pytest.approx(_slow_dcor_unbiased(x, y), rel=1e-9)
    assert privacy.dcor_biased(x, y) == pytest.approx(_slow_dcor_biased(x, y), rel=1e-9)


def test_dcor_is_one_for_a_similarity_and_near_zero_for_noise() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 64))
    assert privacy.dcor_unbiased(x, 3 * x + 1) == pytest.approx(1.0, abs=1e-9)
    noise = rng.standard_normal((300, 128))
    assert abs(privacy.dcor_unbiased(x, noise)) < 0.03
    # the biased statistic is far from 0 on the same independent data: why we report both
    assert privacy.dcor_biased(x, noise) > 0.3


def test_dcor_refuses_bad_input() -> None:
    with pytest.raises(ConfigError, match="paired"):
        privacy.dcor_unbiased(np.zeros((5, 2)), np.zeros((6, 2)))
    with pytest.raises(ConfigError, match="at least 4"):
        privacy.dcor_unbiased(np.zeros((3, 2)), np.zeros((3, 2)))


# ------------------------------------------------------------------------------ image quality
def test_psnr_and_ssim() -> None:
    rng = np.random.default_rng(0)
    x = rng.random((10, 64))
    assert privacy.psnr(x, x) == math.inf
    assert privacy.psnr(x, x + 0.1) == pytest.approx(20.0)
    shape = privacy.image_shape((64,))
    assert shape == (8, 8)
    assert privacy.ssim(x, x, shape) == pytest.approx(1.0)
    noisy = np.clip(x + 0.3 * rng.standard_normal(x.shape), 0, 1)
    assert privacy.ssim(x, noisy, shape) < 0.8
    assert privacy.image_shape((30,)) == (30,)
    assert 0 < privacy.ssim(x[:, :30], noisy[:, :30], (30,)) < 1
    with pytest.raises(ConfigError, match="does not match"):
        privacy.psnr(x, x[:, :5])


# ------------------------------------------------------------------------------ label leakage
def test_auc_matches_pairwise_count_with_ties() -> None:
    rng = np.random.default_rng(1)
    scores = rng.integers(0, 5, 60).astype(float)   # many ties
    pos = rng.random(60) < 0.4
    assert privacy.auc(scores, pos) == pytest.approx(_slow_auc(scores, pos))
    assert math.isnan(privacy.auc(scores, np.zeros(60, bool)))


def _planted(rng: np.random.Generator, classes: int, leak: bool
             ) -> list[tuple[np.ndarray, np.ndarray]]:
    dirs = rng.standard_normal((classes, 32))
    batches = []
    for _ in range(20):
        y = rng.integers(0, classes, 32)
        g = rng.standard_normal((32, 32))
        if leak:  # the gradient points along its class direction, and positives are larger
            g = 0.3 * g + dirs[y] * (1 + (y == classes - 1))[:, None]
        batches.append((g, y))
    return batches


@pytest.mark.parametrize("classes", [2, 10])
def test_label_attacks_find_a_planted_leak_and_none_in_noise(classes: int) -> None:
    rng = np.random.default_rng(classes)
    leak = privacy.label_leak([_planted(rng, classes, True)], classes)
    assert leak.cosine_auc > 0.95
    assert leak.label_auc > 0.95
    none = privacy.label_leak([_planted(rng, classes, False)] * 1, classes)
    assert none.norm_auc < 0.6
    assert none.cosine_auc < 0.6
    assert len(none.norm_auc_per_epoch) == 1


def test_label_leak_takes_the_maximum_over_epochs() -> None:
    rng = np.random.default_rng(5)
    leak = privacy.label_leak([_planted(rng, 2, False), _planted(rng, 2, True)], 2)
    assert leak.cosine_auc_per_epoch[0] < 0.6 < leak.cosine_auc_per_epoch[1]
    assert leak.cosine_auc == max(leak.cosine_auc_per_epoch)


# ------------------------------------------------------------------------------ inversion
class _Noise(nn.Module):
    """A 'client segment' whose output does not depend on its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.randn(x.shape[0], 64)


def _fake_trained(lower: nn.Module) -> SimpleNamespace:
    return SimpleNamespace(spec=TrainSpec(data="digits", codec="fp32"),
                           dataset=load_dataset("digits"), client_segments=[lower],
                           feature_blocks=[])


def test_inversion_of_an_identity_cut_recovers_the_input() -> None:
    m = invert(_fake_trained(nn.Identity()), PrivacyOptions()).metrics
    assert m["inversion_psnr_db"] > m["mean_baseline_psnr_db"] + 8
    assert m["inversion_ssim"] > 0.9
    assert m["dcor"] == pytest.approx(1.0, abs=1e-6)


def test_inversion_of_pure_noise_stays_at_the_mean_baseline() -> None:
    torch.manual_seed(0)
    m = invert(_fake_trained(_Noise()), PrivacyOptions()).metrics
    assert m["inversion_psnr_db"] < m["mean_baseline_psnr_db"] + 1.0
    assert abs(m["dcor"]) < 0.05


def test_privacy_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="privacy-aux"):
        PrivacyOptions(aux_fraction=1.5).validate()


# ------------------------------------------------------------------------------ end to end
def test_train_and_attack_records_the_gradients_the_client_receives() -> None:
    spec = TrainSpec(data="digits", cut="relu2", codec="q4+zstd", epochs=2)
    result, cell = train_and_attack(spec, PrivacyOptions(decoder_steps=30, query_free=True,
                                                         shadow_steps=100))
    m = cell.metrics
    assert result.accuracy > 0.5
    assert len(m["label_cosine_auc_per_epoch"]) == 2
    # vanilla gradients reveal the labels (the cosine attack, one known sample per batch)
    assert m["label_auc"] > 0.9
    assert m["inversion_psnr_db"] > m["mean_baseline_psnr_db"]
    assert len(cell.reconstructions) == len(cell.originals) == 8
    # the query-free attack (shadow client through the frozen server) beats the baseline too
    assert m["query_free_psnr_db"] > m["mean_baseline_psnr_db"] + 1


def test_evaluate_privacy_cli_writes_the_columns_and_reuses_the_cache(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgesplit.cli.main import main

    out = tmp_path / "priv"
    argv = ["evaluate", "--data", "digits", "--cuts", "relu1,relu2", "--codecs", "fp32",
            "--seeds", "1", "--epochs", "1", "--privacy", "full", "--devices", "rpi4",
            "--links", "wifi", "--out", str(out), "--json", "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(capsys.readouterr().out)
    for row in doc["rows"]:
        p = row["privacy"]
        for key in ("inversion_psnr_db", "mean_baseline_psnr_db", "inversion_ssim", "dcor",
                    "label_auc"):
            assert isinstance(p[key], float), key
        assert p["inversion_psnr_db"] > p["mean_baseline_psnr_db"]
    for name in ("privacy.png", "inversion_relu1.png", "inversion_relu2.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG", name
    report = (out / "report.md").read_text()
    assert "## Privacy" in report and "inversion_relu2.png" in report
    assert "query-free PSNR dB" in report
    assert "--privacy full" in doc["command"]
    assert "privacy.label_auc" in (out / "results.csv").read_text().splitlines()[0]
    # a rerun re-uses the attacked cells: nothing is trained again
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["cache"]["trained_cells"] == 0
    assert again["rows"][0]["privacy"] == doc["rows"][0]["privacy"]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"defense": "bogus:1"}, "unknown defense 'bogus'.*valid: noise"),
    ({"max_psnr": 12.0}, "add --privacy"),
    ({"privacy": True, "privacy_aux": 1.0}, "privacy-aux"),
    ({"privacy": True, "max_label_auc": 0.1}, "max-label-auc"),
])
def test_sweep_refuses_bad_privacy_options(tmp_path: Path, kwargs: dict, match: str) -> None:
    from edgesplit.evaluate.sweep import SweepArgs, run_sweep

    args = SweepArgs(cuts=["relu1"], codecs=["fp32"], seeds=1, epochs=1,
                     out=str(tmp_path), **kwargs)
    with pytest.raises(ConfigError, match=match):
        run_sweep(args, on_progress=None, write_report=False)


def test_gradient_log_keeps_at_most_the_asked_batches_and_pairs_passive_parties() -> None:
    from edgesplit.evaluate.privacy_run import GradientLog

    log = GradientLog(max_batches=2)
    for i in range(3):
        log.add("client-0", np.full((4, 2), i, np.float32), np.arange(4) % 2)
        log.add("client-1", np.full((4, 2), 10 + i, np.float32), None)
    log.next_epoch()
    batches = log.batches("client-0", ["client-1"])
    assert len(batches) == 1 and len(batches[0]) == 2   # capped at 2 per epoch
    grad, labels = batches[0][1]
    assert grad[0, 0] == 11 and list(labels) == [0, 1, 0, 1]   # the holder's 2nd batch labels
    assert log.full("client-0") is False   # a new epoch starts empty


def test_decoder_ignores_a_feature_that_is_constant_on_the_attackers_data() -> None:
    from edgesplit.evaluate.privacy_run import fit_decoder

    rng = np.random.default_rng(0)
    z_aux = rng.standard_normal((64, 4)).astype(np.float32)
    z_aux[:, 3] = 0.5                       # a coarse codec made it constant here...
    z_test = rng.standard_normal((16, 4)).astype(np.float32)   # ...but not here
    t_aux = rng.random((64, 6)).astype(np.float32)
    out = fit_decoder(z_aux, t_aux, z_test, PrivacyOptions(decoder_steps=20), torch)
    assert np.isfinite(out).all() and np.abs(out).max() < 10

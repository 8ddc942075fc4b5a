"""Identity: a checkpoint's run id travels into the bundle and the server segment beside it;
an export never silently replaces an earlier one; ``export --trainable`` flags."""

from __future__ import annotations

import json

import pytest

from edgesplit.cli.main import main
from edgesplit.edge.bundle import load_bundle, read_manifest
from edgesplit.errors import ExportError
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(digits_trained, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ident") / "ck", digits_trained)


def test_run_id_goes_from_checkpoint_to_bundle_and_server(checkpoint, tmp_path):
    ck = load_checkpoint(checkpoint)
    run_id = ck.run_id
    assert run_id and len(run_id) == 32 and int(run_id, 16) >= 0
    report = export_bundle(SplitModel.from_checkpoint(ck), tmp_path / "b")
    assert report.manifest["run_id"] == run_id
    assert load_bundle(report.bundle).run_id == run_id
    assert json.loads((report.server / "export.json").read_text())["run_id"] == run_id
    assert json.loads((report.server / "checkpoint.json").read_text())["run_id"] == run_id



def test_each_save_gets_a_new_run_id(digits_trained, tmp_path):
    a = load_checkpoint(save_checkpoint(tmp_path / "a", digits_trained)).run_id
    b = load_checkpoint(save_checkpoint(tmp_path / "b", digits_trained)).run_id
    assert a and b and a != b


def test_model_without_checkpoint_gets_a_run_id(digits_trained, tmp_path):
    a = export_bundle(SplitModel.from_trained(digits_trained), tmp_path / "a").manifest
    b = export_bundle(SplitModel.from_trained(digits_trained), tmp_path / "b").manifest
    assert a["run_id"] != b["run_id"] and len(a["run_id"]) == 32


def test_an_earlier_export_is_replaced_only_with_force(checkpoint, tmp_path):
    model = SplitModel.from_checkpoint(load_checkpoint(checkpoint))
    first = export_bundle(model, tmp_path / "b")
    (tmp_path / "b" / "marker").write_text("from the first export")
    with pytest.raises(ExportError, match=r"holds an earlier export \(bundle .*run "
                                          rf"{first.manifest['run_id']}.*pass --force"):
        export_bundle(model, tmp_path / "b")
    assert (tmp_path / "b" / "marker").is_file()
    export_bundle(model, tmp_path / "b", ExportOptions(force=True))
    assert not (tmp_path / "b" / "marker").exists()
    assert read_manifest(tmp_path / "b" / "manifest.json")["run_id"] == first.manifest["run_id"]


def test_cli_refuses_to_overwrite_in_one_line_and_forces(checkpoint, tmp_path, capsys):
    out = str(tmp_path / "b")
    assert main(["export", "--from", str(checkpoint), "--out", out, "--json"]) == 0
    capsys.readouterr()
    assert main(["export", "--from", str(checkpoint), "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert main(["export", "--from", str(checkpoint), "--out", out, "--force", "--json"]) == 0


@pytest.mark.parametrize("extra, message", [
    (["--weights", "int8"], "cannot be combined with --weights int8"),
    (["--device", "rpi4"], "does not take --device"),
])
def test_trainable_refuses_options_it_cannot_honour(checkpoint, tmp_path, capsys, extra,
                                                    message):
    code = main(["export", "--from", str(checkpoint), "--out", str(tmp_path / "t"),
                 "--trainable", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "t").exists()


def test_trainable_export_prints_one_line(checkpoint, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["export", "--from", str(checkpoint), "--out", str(out), "--trainable"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trainable bundle ")
    assert "trainable parameters" in lines[0] and "gradient parity ok" in lines[0]
    manifest = read_manifest(out / "manifest.json")
    assert "trainable" in manifest and manifest["run_id"] in lines[0]
    assert main(["export", "--from", str(checkpoint), "--out", str(out), "--trainable"]) == 2

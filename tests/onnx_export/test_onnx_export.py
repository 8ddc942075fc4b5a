"""ONNX export: a checked, self-contained, dynamic-batch model that matches torch, a complete
manifest, the server segment beside the bundle, and device checks that refuse what cannot run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgesplit.cli.main import main
from edgesplit.devices import DeviceProfile, load_device
from edgesplit.edge.bundle import REQUIRED_KEYS, load_bundle
from edgesplit.errors import ExportError
from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle, server_dir
from edgesplit.train.checkpoint import save_checkpoint
from edgesplit.train.engine import build_split, run_training
from edgesplit.train.spec import TrainSpec


@pytest.fixture(scope="module")
def trained(digits_trained):
    return digits_trained


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "digits"
    return export_bundle(SplitModel.from_trained(trained), out, ExportOptions(device="rpi4"))


def test_model_passes_full_check_with_opset_18_and_inline_weights(exported):
    path = exported.bundle / "client.onnx"
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path), load_external_data=False)
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx", 0)) >= 18
    assert model.graph.initializer, "weights must be in the graph"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    assert sorted(p.name for p in exported.bundle.iterdir()) == ["client.onnx", "manifest.json"]


def test_dynamic_batch_runs_in_onnxruntime(exported, trained):
    session = ort.InferenceSession(str(exported.bundle / "client.onnx"),
                                   providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.shape == ["batch", 64]
    segment = trained.client_segments[-1].eval()
    for batch in (1, 5):
        x = trained.dataset.x_test[:batch]
        (got,) = session.run(None, {inp.name: x})
        assert got.shape == (batch, 128)
        with torch.no_grad():
            np.testing.assert_allclose(got, segment(torch.from_numpy(x)).numpy(), atol=1e-5,
                                       rtol=1e-4)


def test_manifest_fields_parity_and_sha256(exported, trained):
    m = json.loads((exported.bundle / "manifest.json").read_text())
    assert set(REQUIRED_KEYS) <= m.keys() and m["schema"] == 1
    digest = hashlib.sha256((exported.bundle / "client.onnx").read_bytes()).hexdigest()
    assert m["sha256"] == {"client.onnx": digest}
    assert m["input"] == {"name": "x", "shape": ["batch", 64], "dtype": "float32"}
    assert m["output"] == {"name": "cut", "shape": ["batch", 128], "dtype": "float32"}
    assert m["cut_shape"] == [128] and m["cuts"] == ["relu1"]
    assert (m["codec"], m["grad_codec"], m["config"]) == ("q8+zstd", "fp32", "vanilla")
    assert (m["num_classes"], m["label_dtype"], m["opset"]) == (10, "uint8", 18)
    assert m["weights"] == "fp32" and m["int8_accuracy_change"] is None
    parity = m["parity"]
    assert parity["passed"] and parity["batch_sizes"] == [1, 2, 7, 32]
    assert parity["max_abs"] <= parity["atol"] + parity["rtol"] and parity["atol"] == 1e-5
    assert m["client"]["params"] == 64 * 128 + 128 and m["client"]["flops_per_sample"] > 0
    assert m["device"]["device"] == "rpi4" and m["device"]["fits"]
    assert m["party"] == 0 and m["feature_block"] is None and m["head"] is None
    assert {"torch", "onnx", "onnxruntime", "exporter"} <= m["versions"].keys()
    assert m["source"]["trained"] and m["source"]["accuracy"] == trained.result.accuracy


def test_server_segment_is_beside_the_bundle_not_inside(exported, trained):
    server = exported.server
    assert server == server_dir(exported.bundle) and server.parent == exported.bundle.parent
    assert not any(p.suffix == ".pt" for p in exported.bundle.rglob("*"))
    assert {p.name for p in server.iterdir()} == {"checkpoint.json", "server.pt", "export.json"}
    state = torch.load(server / "server.pt", weights_only=True)
    for key, value in trained.server_segment.state_dict().items():
        torch.testing.assert_close(state[key], value)
    link = json.loads((server / "export.json").read_text())
    assert link["client_sha256"] == exported.manifest["sha256"]["client.onnx"]
    assert json.loads((server / "checkpoint.json").read_text())["spec"]["codec"] == "q8+zstd"


def test_ushape_bundle_holds_the_head_and_runs_end_to_end(trained, tmp_path):
    # initialised weights are enough here: the test is about the head's place and wiring
    data = trained.dataset
    parts = build_split(TrainSpec(config="ushape"), data.input_shape, data.num_classes)
    model = SplitModel(config="ushape", lowers=parts.lowers, server=parts.server,
                       head=parts.head, input_shape=data.input_shape,
                       num_classes=data.num_classes, cuts=parts.cuts, dataset=data)
    report = export_bundle(model, tmp_path / "u")
    assert (report.bundle / "head.onnx").is_file()
    assert report.manifest["head"]["input"]["shape"] == ["batch", 64]
    assert report.manifest["sha256"].keys() == {"client.onnx", "head.onnx"}
    bundle = load_bundle(report.bundle)
    x = data.x_test[:9]
    with torch.no_grad():
        mid = parts.server.eval()(torch.from_numpy(bundle.run(x))).numpy()
        want = parts.head.eval()(parts.server(parts.lowers[0].eval()(torch.from_numpy(x))))
    np.testing.assert_allclose(bundle.run_head(mid), want.numpy(), atol=1e-4, rtol=1e-4)
    assert bundle.manifest["head"]["parity"]["passed"]


def test_vertical_party_exports_its_feature_block(tmp_path):
    trained = run_training(TrainSpec(config="vertical", clients=2, epochs=1))
    report = export_bundle(SplitModel.from_trained(trained), tmp_path / "v",
                           ExportOptions(party=1))
    m = report.manifest
    assert m["feature_block"] == [32, 64] and m["input"]["shape"] == ["batch", 32]
    assert m["party"] == 1 and m["parties"] == 2
    bundle = load_bundle(report.bundle)
    x = trained.dataset.x_test[:4]
    with torch.no_grad():
        want = trained.client_segments[1].eval()(torch.from_numpy(x[:, 32:])).numpy()
    np.testing.assert_allclose(bundle.run(bundle.select_features(x)), want, atol=1e-5)
    with pytest.raises(ExportError, match="out of range"):
        export_bundle(SplitModel.from_trained(trained), tmp_path / "v2", ExportOptions(party=2))


def _device(**overrides) -> DeviceProfile:
    fields = dict(name="tiny", description="test device", effective_gflops_fp32=1.0,
                  effective_gflops_int8=2.0, memory_mib=512, max_onnx_opset=21,
                  execution_provider="CPUExecutionProvider")
    return DeviceProfile(**{**fields, **overrides})


def test_device_with_old_opset_is_refused_an_explicit_newer_opset(trained, tmp_path):
    with pytest.raises(ExportError, match="opset ≤ 17.*pass --opset 17"):
        export_bundle(SplitModel.from_trained(trained), tmp_path / "o",
                      ExportOptions(opset=18, device=_device(max_onnx_opset=17)))
    assert not (tmp_path / "o").exists()


def test_device_with_too_little_memory_is_refused(trained, tmp_path):
    toml = tmp_path / "small.toml"
    toml.write_text('name = "small"\ndescription = "1 MiB microcontroller"\n'
                    "effective_gflops_fp32 = 0.1\neffective_gflops_int8 = 0.2\n"
                    "memory_mib = 1\nmax_onnx_opset = 21\n"
                    'execution_provider = "CPUExecutionProvider"\n')
    with pytest.raises(ExportError, match="small cannot run this export: needs ~.* MiB"):
        export_bundle(SplitModel.from_trained(trained), tmp_path / "m",
                      ExportOptions(device=load_device(str(toml))))
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.server").exists()


class _Drift(nn.Module):
    """Scales by a call counter: torch.export bakes the value it saw, eager keeps counting."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x * float(self.calls)


def test_parity_failure_is_an_export_error_and_writes_nothing(trained, tmp_path):
    model = SplitModel(config="vanilla", lowers=[nn.Sequential(nn.Linear(64, 8), _Drift())],
                       server=nn.Sequential(nn.Linear(8, 10)), head=None, input_shape=(64,),
                       num_classes=10, dataset=trained.dataset)
    with pytest.raises(ExportError, match="parity FAILED"):
        export_bundle(model, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_a_folder_that_is_not_a_bundle(trained, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="refusing to overwrite"):
        export_bundle(SplitModel.from_trained(trained), tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_cli_exports_a_checkpoint_as_json(trained, tmp_path, capsys):
    ck = save_checkpoint(tmp_path / "ck", trained)
    code = main(["export", "--from", str(ck), "--out", str(tmp_path / "b"), "--device", "rpi4",
                 "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["bundle"] == str(tmp_path / "b")
    assert out["manifest"]["source"]["checkpoint"] == str(ck)
    assert Path(out["server"], "server.pt").read_bytes() == (ck / "server.pt").read_bytes()
    assert load_bundle(out["bundle"]).codec == "q8+zstd"


def test_cli_missing_checkpoint_is_one_line_and_exit_2(cli, tmp_path):
    out = cli("export", "--from", str(tmp_path / "nope"))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "not a checkpoint" in lines[0], out.stderr


def test_export_recipe_sets_target_options_and_refuses_unknown_keys(tmp_path):
    from edgesplit.cli.export import resolve_target
    from edgesplit.cli.main import build_parser
    from edgesplit.errors import ConfigError

    recipe = tmp_path / "r.toml"
    recipe.write_text('device = "rpi4"\nweights = "int8"\nopset = 19\n')
    args = build_parser().parse_args(["export", "--recipe", str(recipe), "--opset", "20"])
    resolve_target(args)   # --opset given on the command line: the recipe must not override it
    assert (args.device, args.weights, args.opset) == ("rpi4", "int8", 20)
    recipe.write_text("colour = 1\n")
    args = build_parser().parse_args(["export", "--recipe", str(recipe)])
    with pytest.raises(ConfigError, match="unknown keys colour"):
        resolve_target(args)

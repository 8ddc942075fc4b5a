"""Shared fixtures of the edge runtime tests: a trained digits model exported as a bundle, and
real gRPC servers serving its server segment (fresh weights per server).

Training and export dominate the runtime, so they happen once per session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgesplit.onnx_export import ExportOptions, SplitModel, export_bundle
from edgesplit.train.checkpoint import load_checkpoint, save_checkpoint
from edgesplit.train.engine import run_training
from edgesplit.train.server import SplitServer
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.grpc_server import RunningServer, serve_handler
from edgesplit.transport.tokens import Role, TokenGrant

#: Client name -> bearer token of every test server.
TOKENS = {"edge": "edge-token-0123456789", "peer": "peer-token-9876543210"}
TOKEN = TOKENS["edge"]
#: What every test server grants: ``edge`` trains and reads Status (role=train,admin); ``peer``
#: is a plain training token (role=train), which Status refuses.
SERVED = {**TOKENS, "edge": TokenGrant(TOKENS["edge"], frozenset({Role.TRAIN, Role.ADMIN}))}


@pytest.fixture(scope="session")
def token() -> str:
    """The bearer token of the client called ``edge`` on every test server."""
    return TOKEN


@dataclass
class Exported:
    """A trained checkpoint, its exported bundle and its data as an .npz."""

    checkpoint: Path
    bundle: Path
    npz: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    accuracy: float


def _export(root: Path, spec: TrainSpec, name: str) -> Exported:
    trained = run_training(spec)
    ckpt = save_checkpoint(root / f"{name}-ckpt", trained)
    bundle = root / name
    model = SplitModel.from_checkpoint(load_checkpoint(ckpt))
    export_bundle(model, bundle, ExportOptions(name=name))
    for party in range(1, model.parties):  # vertical: NAME-party1, ... beside NAME (party 0)
        export_bundle(model, root / f"{name}-party{party}",
                      ExportOptions(name=f"{name}-party{party}", party=party))
    data = trained.dataset
    npz = root / f"{name}.npz"
    np.savez(npz, x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return Exported(ckpt, bundle, npz, data.x_train, data.y_train, data.x_test, data.y_test,
                    trained.result.accuracy)


@pytest.fixture(scope="session")
def vanilla(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """vanilla digits MLP, 3 epochs, q8+zstd activations (~0.95 test accuracy)."""
    return _export(tmp_path_factory.mktemp("edge-vanilla"),
                   TrainSpec(epochs=3, codec="q8+zstd"), "digits-vanilla")


@pytest.fixture(scope="session")
def cnn(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """vanilla cnn2d on 1×8×8 digit images cut at pool1, 3 epochs, q8+zstd activations."""
    from edgesplit.data import load_dataset

    root = tmp_path_factory.mktemp("edge-cnn")
    digits = load_dataset("digits")
    npz = root / "digits-images.npz"
    np.savez(npz, x=digits.x_train.reshape(-1, 1, 8, 8), y=digits.y_train,
             x_test=digits.x_test.reshape(-1, 1, 8, 8), y_test=digits.y_test)
    return _export(root, TrainSpec(data=str(npz), model="cnn2d", epochs=3, codec="q8+zstd"),
                   "digits-cnn")


@pytest.fixture(scope="session")
def ushape(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """ushape digits MLP, 2 epochs: the bundle carries the head, the server the middle."""
    return _export(tmp_path_factory.mktemp("edge-ushape"),
                   TrainSpec(epochs=2, config="ushape", codec="q8+zstd"), "digits-ushape")


@pytest.fixture(scope="session")
def vertical(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """vertical digits, 2 parties, 1 epoch: bundles NAME (party 0) and NAME-party1."""
    return _export(tmp_path_factory.mktemp("edge-vertical"),
                   TrainSpec(epochs=1, config="vertical", clients=2, codec="q8+zstd"),
                   "digits-vertical")


@dataclass
class Served:
    """A live split server: the engine object and the gRPC server in front of it."""

    engine: SplitServer
    grpc: RunningServer

    @property
    def address(self) -> str:
        return self.grpc.address


@pytest.fixture
def serve() -> Iterator[Callable[[Exported], Served]]:
    """Start a real gRPC server for an export's checkpoint (fresh server weights each call).
    It knows the class count, as ``edgesplit serve`` does, so its WELCOME offers packed labels
    ``y`` (``start_server`` does not: its clients send labels frames)."""
    started: list[RunningServer] = []

    def start(exported: Exported) -> Served:
        ckpt = load_checkpoint(exported.checkpoint)
        engine = SplitServer(ckpt.spec.config, ckpt.parts.server, codec=ckpt.spec.codec,
                             grad_codec=ckpt.spec.grad_codec, num_classes=ckpt.num_classes)
        running = serve_handler(engine.handle, port=0, tokens=SERVED, status=engine.status,
                                max_workers=4)
        started.append(running)
        return Served(engine, running)

    yield start
    for running in started:
        running.stop(None)


@dataclass
class TrainableExport:
    """A 1-epoch vanilla digits checkpoint exported with ``export_trainable``, its data."""

    checkpoint: Path
    bundle: Path
    npz: Path
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


@pytest.fixture(scope="session")
def trainable(tmp_path_factory: pytest.TempPathFactory) -> TrainableExport:
    """vanilla digits MLP trained 1 epoch (≈0.77 test accuracy), exported trainable."""
    from edgesplit.onnx_export.trainable import export_trainable

    root = tmp_path_factory.mktemp("edge-trainable")
    trained = run_training(TrainSpec(epochs=1, seed=0))
    ckpt = save_checkpoint(root / "ckpt", trained)
    bundle = root / "digits-trainable"
    export_trainable(SplitModel.from_checkpoint(load_checkpoint(ckpt)), bundle)
    data = trained.dataset
    npz = root / "digits.npz"
    np.savez(npz, x=data.x_train, y=data.y_train, x_test=data.x_test, y_test=data.y_test)
    return TrainableExport(ckpt, bundle, npz, data.x_train, data.y_train, data.x_test,
                           data.y_test)


@pytest.fixture
def start_server() -> Iterator[Callable[..., tuple[SplitServer, RunningServer | None]]]:
    """``start_server(checkpoint, grpc=True)``: a fresh server for a checkpoint (its spec's
    lr), behind gRPC on loopback (stopped after the test) or, with ``grpc=False``, not."""
    started: list[RunningServer] = []

    def start(checkpoint: Path, *, grpc: bool = True
              ) -> tuple[SplitServer, RunningServer | None]:
        ckpt = load_checkpoint(checkpoint)
        engine = SplitServer(ckpt.spec.config, ckpt.parts.server, codec=ckpt.spec.codec,
                             grad_codec=ckpt.spec.grad_codec, lr=ckpt.spec.lr)
        if not grpc:
            return engine, None
        running = serve_handler(engine.handle, port=0, tokens=SERVED, status=engine.status,
                                max_workers=4)
        started.append(running)
        return engine, running

    yield start
    for running in started:
        running.stop(None)


@pytest.fixture(scope="session")
def trainable_vertical(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], Any]:
    """vertical digits, 2 parties, 1 epoch: (checkpoint, [party 0 bundle, party 1 bundle],
    dataset), each party exported trainable."""
    from edgesplit.onnx_export.trainable import export_trainable

    root = tmp_path_factory.mktemp("edge-trainable-vertical")
    trained = run_training(TrainSpec(epochs=1, seed=0, config="vertical", clients=2))
    ckpt = save_checkpoint(root / "ckpt", trained)
    model = SplitModel.from_checkpoint(load_checkpoint(ckpt))
    bundles = [root / f"party{k}" for k in range(2)]
    for k, bundle in enumerate(bundles):
        export_trainable(model, bundle, party=k)
    return ckpt, bundles, trained.dataset

"""A torch client that trains its own lower layers against ``edgesplit serve`` over gRPC.

It runs the same :class:`~edgesplit.train.client.SplitClient` role and the same per-client
batch plan (:func:`~edgesplit.train.engine.epoch_plan`) as the in-process engine, so a
networked run trains on exactly the batches its in-process twin does. The model, cut, seed and
codecs come from the server's WELCOME, so client and server always build matching segments.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from edgesplit.data import load_dataset
from edgesplit.errors import ConfigError
from edgesplit.split.preprocess import refit
from edgesplit.train.client import SplitClient
from edgesplit.train.engine import build_split, client_rows, epoch_plan
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.base import Transport
from edgesplit.wire.labels import PACKED_LABELS
from edgesplit.wire.messages import Kind, Message, expect


def hello(
    transport: Transport, session: str, meta: dict[str, Any], name: str = ""
) -> dict[str, Any]:
    """Open a session; returns the server's WELCOME meta (config, codecs, spec, shapes).
    ``name``: the client name the session's steps carry (a server with tokens uses the
    token's name instead)."""
    reply = expect(
        transport.request(Message(Kind.HELLO, session, name, 0, meta=meta)), Kind.WELCOME
    )
    return reply.meta


def bye(transport: Transport, session: str, name: str, step: int) -> None:
    """Close a session: BYE → ACK (the server forgets the session's records)."""
    expect(transport.request(Message(Kind.BYE, session, name, step)), Kind.ACK)


def train_remote(
    transport: Transport,
    data_source: str,
    *,
    index: int = 0,
    clients: int | None = None,
    epochs: int | None = None,
    config: str | None = None,
    initial_weights: str | None = None,
    session: str | None = None,
    shard: tuple[int, int] | None = None,
    on_epoch: Any = None,
) -> dict[str, Any]:
    """Train client ``index`` of the server's run over ``transport``; return a report dict.

    ``shard=(I, N)`` trains on the I-th of N IID shards of the local data (to simulate N data
    holders from one dataset, exactly as the in-process engine splits it); by default the
    client trains on all of its local data.

    The session opens with HELLO and, once training and the test evaluation are done, closes
    with BYE, so the server knows this client finished (a 1-client run is then over).
    """
    session = session or uuid.uuid4().hex[:12]
    name = f"client-{index}"
    welcome = hello(
        transport, session, {"mode": "train", "runtime": "torch", "index": index}, name
    )
    spec_dict = dict(welcome.get("spec") or {})
    if not spec_dict:
        raise ConfigError(
            "the server did not send its training spec; start it with "
            "`edgesplit serve` from this version of edgesplit"
        )
    shapes = spec_dict.pop("shapes", {})
    spec = TrainSpec(**{k: v for k, v in spec_dict.items() if k in TrainSpec.__dataclass_fields__})
    if config is not None and config != spec.config:
        raise ConfigError(f"--config {config} does not match the server's {spec.config}")
    n_clients = clients or spec.clients
    if not 0 <= index < n_clients:
        raise ConfigError(f"--index {index} is outside 0..{n_clients - 1}")
    epochs = epochs or spec.epochs
    data = load_dataset(data_source)
    input_shape = tuple(shapes.get("input_shape", data.input_shape))
    num_classes = int(shapes.get("num_classes", data.num_classes))
    if data.input_shape != input_shape:
        raise ConfigError(
            f"local data has samples of shape {data.input_shape}; the server's "
            f"model takes {input_shape}"
        )
    torch.manual_seed(spec.seed)  # the same initial weights as the server's and our twins'
    parts = build_split(spec, input_shape, num_classes)
    lower = parts.lowers[index if spec.config == "vertical" else 0]
    # input statistics from this client's own rows, as its in-process twin fits them
    rows = (
        np.arange(len(data.y_train))
        if spec.config == "vertical"
        else client_rows(spec, len(data.y_train), index)
    )
    x_own = data.x_train[rows]
    cols = parts.blocks[index] if spec.config == "vertical" else None
    refit(lower, x_own[..., cols[0] : cols[1]] if cols is not None else x_own)
    if initial_weights:
        from edgesplit.train.checkpoint import load_checkpoint

        lower.load_state_dict(
            load_checkpoint(initial_weights)
            .parts.lowers[index if spec.config == "vertical" else 0]
            .state_dict()
        )
    client = SplitClient(
        name=name,
        lower=lower,
        transport=transport,
        codec=spec.codec,
        grad_codec=spec.grad_codec,
        num_classes=num_classes,
        lr=spec.lr,
        head=parts.head,
        party=index if spec.config == "vertical" else None,
        parties=n_clients if spec.config == "vertical" else None,
        group=str(welcome.get("group", "")),
        send_labels=spec.config != "vertical" or index == 0,
        # a server that reads bare packed labels says so in its WELCOME
        packed_labels=welcome.get("labels") == PACKED_LABELS,
        session=session,
        reference_shape=parts.reference_shapes[index if spec.config == "vertical" else 0],
    )
    client.step = int(welcome.get("resume_step", 1)) - 1
    block = parts.blocks[index] if spec.config == "vertical" else None

    def view(x: np.ndarray) -> torch.Tensor:
        if block is not None:
            x = x[..., block[0] : block[1]]
        return torch.from_numpy(np.ascontiguousarray(x))

    start = time.perf_counter()
    history = []
    samples = 0
    holders, own = (shard[1], shard[0]) if shard else (1, index)
    for epoch in range(epochs):
        # vertical parties get one shared order from epoch_plan whatever holders/own say
        plan = epoch_plan(
            spec.config, len(data.y_train), holders, own, spec.seed, epoch, spec.batch_size
        )
        samples += sum(len(rows) for rows in plan)
        turn_based = spec.config in ("vanilla", "ushape") and n_clients > 1
        if turn_based and (index > 0 or epoch > 0):
            client.take_over(turn=epoch * n_clients + index)
        results = [
            client.train_step(
                view(data.x_train[rows]),
                torch.from_numpy(data.y_train[rows]),
                ids=rows if spec.config == "vertical" else None,
                report=rows is plan[-1],  # the server's loss and accuracy, once an epoch
            )
            for rows in plan
        ]
        if turn_based:
            client.hand_off()
        if spec.config == "splitfed":
            client.federated_average(epoch, index, n_clients, sum(len(r) for r in plan))
        # as in process: an entropy-coded codec (fq:B,ans) fits its model on this epoch's codes
        client.refit_entropy_model()
        n = sum(r.n for r in results)
        row = {
            "loss": sum(r.loss * r.n for r in results) / n,
            "train_accuracy": sum(r.correct for r in results) / n,
        }
        history.append(row)
        if on_epoch:
            on_epoch(epoch, epochs, row)
    if spec.config in ("vanilla", "ushape") and n_clients > 1:
        client.take_over(turn=epochs * n_clients)  # evaluate with the final weights
    seconds = time.perf_counter() - start
    correct = 0
    for s in range(0, len(data.y_test), 256):
        preds = client.predict(view(data.x_test[s : s + 256]))
        correct += int((preds == data.y_test[s : s + 256]).sum())
    # the run is over for this client: the server releases the session and counts it done (a
    # run ends when all its expected clients said BYE); a client that fails before here keeps
    # its session, so it can come back and resume
    bye(transport, session, client.name, client.step + 1)
    b = client.traffic
    return {
        "client": client.name,
        "config": spec.config,
        "codec": client.act.codec.spec,
        "grad_codec": client.grad.codec.spec,
        "epochs": epochs,
        "samples": samples,
        "accuracy": correct / len(data.y_test),
        "loss": history[-1]["loss"] if history else None,
        **{k: v for k, v in asdict(b).items() if k != "client"},
        "ratio_up": b.bytes_up_fp32 / b.bytes_up if b.bytes_up else None,
        "seconds": seconds,
        "samples_per_s": samples / seconds if seconds else None,
        "history": history,
        "session": session,
    }

"""All four configurations across real processes on loopback: one ``edgesplit serve`` and
trainable torch clients, each its own process, real gRPC. Accuracy within 1 point of the
in-process run (the batch plans are the same, so it usually matches exactly)."""

from __future__ import annotations

import pytest
from netutil import Server, client, finish, write_tokens

from edgesplit.train.engine import run_training
from edgesplit.train.spec import TrainSpec

CASES = {
    "vanilla": dict(clients=2, shard=True),
    "ushape": dict(clients=1, shard=False),
    "vertical": dict(clients=2, shard=False),
    "splitfed": dict(clients=2, shard=True),
}
EPOCHS = 10  # converged: parallel splitfed interleaving then differs by noise only


@pytest.mark.parametrize("config", list(CASES))
def test_config_over_grpc_matches_in_process(tmp_path, config):
    n, shard = CASES[config]["clients"], CASES[config]["shard"]
    names = [f"client-{i}" for i in range(n)]
    tokens = write_tokens(tmp_path / "tokens.txt", names)
    codec = "q8+zstd"
    with Server(
        "--tokens",
        str(tmp_path / "tokens.txt"),
        "--config",
        config,
        "--clients",
        str(n),
        "--epochs",
        str(EPOCHS),
        "--codec",
        codec,
    ) as server:
        procs = []
        for i, name in enumerate(names):
            args = [
                "--trainable",
                "--server",
                server.address,
                "--token",
                tokens[name],
                "--data",
                "digits",
                "--index",
                str(i),
                "--json",
            ]
            if shard:
                args += ["--shard", f"{i}/{n}"]
            procs.append(client(*args))
        reports = [finish(p) for p in procs]
    local = run_training(TrainSpec(config=config, clients=n, epochs=EPOCHS, codec=codec)).result
    final = reports[-1]
    assert abs(final["accuracy"] - local.accuracy) <= 0.01, (final["accuracy"], local.accuracy)
    assert final["accuracy"] >= 0.85
    for report, twin in zip(reports, local.clients, strict=True):
        assert report["codec"] == codec and report["bytes_up"] > 0
        # same batches, same codec: the frames that crossed are the same size, give or take
        # the zstd output of slightly different floats
        assert abs(report["bytes_up"] - twin.bytes_up) <= 0.05 * twin.bytes_up

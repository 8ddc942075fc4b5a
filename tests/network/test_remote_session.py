"""The networked torch client (``train_remote``) against a server built as ``edgesplit serve``
builds it: HELLO first, BYE last, so the server knows a 1-client run finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from edgesplit.train.remote import train_remote
from edgesplit.train.serving import server_fresh
from edgesplit.train.spec import TrainSpec
from edgesplit.transport.inprocess import InProcessTransport
from edgesplit.wire.messages import Kind, Message


@dataclass
class Kinds:
    """An in-process transport that keeps the kinds of the requests and replies."""

    inner: InProcessTransport
    sent: list[str] = field(default_factory=list)
    received: list[str] = field(default_factory=list)

    @property
    def wire_bytes_up(self) -> int:
        return self.inner.wire_bytes_up

    @property
    def wire_bytes_down(self) -> int:
        return self.inner.wire_bytes_down

    def request(self, message: Message) -> Message:
        reply = self.inner.request(message)
        self.sent.append(message.kind)
        self.received.append(reply.kind)
        return reply

    def close(self) -> None:
        self.inner.close()


def test_train_remote_says_hello_first_and_bye_last_and_the_run_is_over():
    server, _ = server_fresh(TrainSpec(epochs=1, seed=0))
    assert server.require_hello
    transport = Kinds(InProcessTransport(server.handle))
    report = train_remote(transport, "digits", epochs=1)
    assert transport.sent[0] == Kind.HELLO and transport.received[0] == Kind.WELCOME
    assert transport.sent[-1] == Kind.BYE and transport.received[-1] == Kind.ACK
    assert Kind.ERROR not in transport.received
    assert report["accuracy"] > 0.5
    # the run's one client said BYE: it is over, and a new training client is refused
    status = server.status()
    assert server.admission.finished is not None and "BYE" in server.admission.finished
    assert status["clients"]["client-0"]["steps"] == -(-1347 // 32)
    late = server.handle(Message(Kind.HELLO, "late", "client-1", 0, meta={"mode": "train"}))
    assert late.kind == Kind.ERROR and late.meta["code"] == "FAILED_PRECONDITION"
    assert "finished" in late.meta["message"]


def test_a_networked_bottleneck_client_refits_its_entropy_model_like_in_process():
    from edgesplit.train.engine import run_training

    spec = TrainSpec(
        epochs=2, seed=0, bottleneck="8:2", codec="fq:2,ans", grad_codec="q4:stochastic"
    )
    server, _ = server_fresh(spec)
    transport = Kinds(InProcessTransport(server.handle))
    remote = train_remote(transport, "digits", epochs=2)
    local = run_training(spec).result
    # the server received the client's entropy model, and the frames use it: the networked
    # run costs about what the in-process run does (packing alone would cost 2 bits a value)
    assert server._models.get("client-0") is not None and server._models["client-0"].models
    per_sample_remote = remote["bytes_up"] / (2 * 1347)
    per_sample_local = local.bytes_up / (2 * 1347)
    assert per_sample_remote < 1.2 * per_sample_local

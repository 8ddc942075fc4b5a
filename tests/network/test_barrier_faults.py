"""A failure inside a rendezvous (vertical parties of a step, a FedAvg round) reaches every
participant with the status it deserves: a server bug is INTERNAL, never INVALID_ARGUMENT."""

from __future__ import annotations

import threading

import pytest

from edgesplit.errors import ProtocolError, TrainingDiverged
from edgesplit.train.barrier import Barriers
from edgesplit.train.server_checks import InternalFault, PreconditionFailed, error_code
from edgesplit.wire.messages import Message


def _meet_all(compute, parties: int = 2) -> dict[int, BaseException | Message]:
    """Every party meets at one key from its own thread; what each got back or raised."""
    cond = threading.Condition()
    barriers = Barriers(cond, lambda: 10.0)
    out: dict[int, BaseException | Message] = {}

    def party(index: int) -> None:
        try:
            out[index] = barriers.meet(("forward:", 1), parties, index, f"part{index}", compute)
        except BaseException as exc:  # noqa: BLE001 - what each participant saw is the result
            out[index] = exc

    threads = [threading.Thread(target=party, args=(k,)) for k in range(parties)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(out) == parties
    return out


def test_a_server_bug_in_the_computation_is_internal_for_every_participant(caplog):
    def compute(parts):
        raise KeyError("oops")

    out = _meet_all(compute)
    for got in out.values():
        assert isinstance(got, InternalFault) and not isinstance(got, ProtocolError)
        assert error_code(got) == "INTERNAL"
        assert "KeyError" in str(got) and "server log" in str(got)
    assert out[0] is not out[1]  # each participant raises its own exception
    assert any("server fault" in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize(("error", "code"), [
    (ProtocolError("parties sent different batch sizes"), "INVALID_ARGUMENT"),
    (PreconditionFailed("this run has 3 parties"), "FAILED_PRECONDITION"),
    (InternalFault("vertical labels vanished"), "INTERNAL"),
    (TrainingDiverged("loss nan"), None),
])
def test_a_refusal_keeps_its_type_and_status_for_every_participant(error, code):
    def compute(parts):
        raise error

    for got in _meet_all(compute).values():
        assert type(got) is type(error) and str(got) == str(error)
        if code is not None:
            assert error_code(got) == code


def test_a_timeout_in_the_computation_stays_a_timeout():
    def compute(parts):
        raise TimeoutError("waited for the FedAvg round")

    for got in _meet_all(compute).values():
        assert type(got) is TimeoutError and "FedAvg" in str(got)


def test_each_participant_gets_its_own_reply():
    def compute(parts):
        return {k: Message("gradient", "", "", 0, meta={"part": p}) for k, p in parts.items()}

    out = _meet_all(compute, parties=3)
    assert {k: m.meta["part"] for k, m in out.items()} == {k: f"part{k}" for k in range(3)}

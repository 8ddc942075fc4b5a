"""The stage registry, the spec grammar and stage-table validation."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from edgesplit.codecs import Codec, parse_codec, stage_by_id, stage_by_name, stage_names
from edgesplit.codecs.base import REGISTRY, StageRegistry, ValueStage
from edgesplit.codecs.fp import Fp32
from edgesplit.errors import CodecError

# The ids written in frames. Changing one breaks every frame already written: this table is the
# contract, not a mirror of the code.
STAGE_IDS = {
    "fp32": 1,
    "fp16": 2,
    "bf16": 3,
    "q8": 8,
    "q4": 9,
    "q2": 10,
    "q1": 11,
    "fq": 12,
    "topk": 16,
    "zstd": 32,
}


def test_stage_ids_are_stable() -> None:
    assert {name: stage_by_name(name).stage_id for name in stage_names()} == STAGE_IDS
    for name, sid in STAGE_IDS.items():
        assert stage_by_id(sid).name == name


def test_stage_names_sorted() -> None:
    assert stage_names() == sorted(STAGE_IDS)


def _dummy(name: str, sid: int) -> type:
    @dataclass(frozen=True)
    class Dummy(Fp32):
        pass

    Dummy.name = name  # type: ignore[misc]
    Dummy.stage_id = sid  # type: ignore[misc]
    return Dummy


def test_registry_refuses_duplicate_name_and_id() -> None:
    reg = StageRegistry()
    reg.register(_dummy("alpha", 1))
    with pytest.raises(CodecError, match="name 'alpha' is already registered"):
        reg.register(_dummy("alpha", 2))
    with pytest.raises(CodecError, match="id 1 of 'beta' is already taken by 'alpha'"):
        reg.register(_dummy("beta", 1))
    assert reg.names() == ["alpha"]


@pytest.mark.parametrize("sid", [0, 256, -1, None])
def test_registry_refuses_bad_ids(sid: object) -> None:
    with pytest.raises(CodecError, match="explicit stage_id"):
        StageRegistry().register(_dummy("gamma", sid))  # type: ignore[arg-type]


def test_global_registry_refuses_duplicates_and_stays_intact() -> None:
    before = dict(REGISTRY.by_name)
    with pytest.raises(CodecError):
        REGISTRY.register(_dummy("q8", 200))
    with pytest.raises(CodecError):
        REGISTRY.register(_dummy("brandnew", 8))
    assert REGISTRY.by_name == before


def test_unknown_stage_lists_valid_names() -> None:
    with pytest.raises(CodecError) as info:
        parse_codec("q3+zstd")
    msg = str(info.value)
    assert "'q3'" in msg
    for name in STAGE_IDS:
        assert name in msg


def test_unknown_stage_id_lists_valid_ids() -> None:
    with pytest.raises(CodecError, match=r"unknown codec stage id 99; valid ids: 1=fp32"):
        stage_by_id(99)


@pytest.mark.parametrize(
    ("spec", "canonical"),
    [
        ("fp32", "fp32"),
        ("zstd", "fp32+zstd"),
        ("zstd:1", "fp32+zstd"),
        (" Q8 + ZSTD ", "q8+zstd"),
        ("q8:stochastic,channel", "q8:channel,stochastic"),
        ("q4:channel+zstd:3", "q4:channel+zstd:3"),
        ("topk:0.10+q8+zstd", "topk:0.1+q8+zstd"),
        ("topk:0.05", "topk:0.05+fp32"),
        ("topk:1+zstd", "topk:1.0+fp32+zstd"),
        ("bf16+zstd:22", "bf16+zstd:22"),
        ("q1", "q1"),
    ],
)
def test_canonical_spec(spec: str, canonical: str) -> None:
    codec = parse_codec(spec)
    assert codec.spec == canonical
    assert parse_codec(codec.spec) == codec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty codec spec"),
        ("q8++zstd", "empty stage"),
        ("q8:chanel", r"q8 has no option 'chanel'; valid options: channel, stochastic"),
        ("q8:channel,channel", "given twice"),
        ("q8:", "no option ''"),
        ("fp32:1", "fp32 takes no parameters"),
        ("topk", "topk takes exactly one parameter"),
        ("topk:0.1:0.2", "topk fraction .0.1:0.2. is not a number"),
        ("topk:abc", "topk fraction 'abc' is not a number"),
        ("topk:0", r"topk fraction must be in \(0, 1\], got '0'"),
        ("topk:1.5", r"must be in \(0, 1\], got '1.5'"),
        ("topk:nan", "must be in"),
        ("topk:-0.1", "must be in"),
        ("zstd:0", r"zstd level must be in 1..22, got '0'"),
        ("zstd:23", "zstd level must be in 1..22"),
        ("zstd:fast", "zstd level 'fast' is not an integer"),
        ("zstd:1,2", "at most one parameter"),
        ("zstd+q8", "stage 'q8' cannot follow 'zstd'.*the order is \\[topk\\] then"),
        ("q8+topk:0.1", "stage 'topk' cannot follow 'q8'"),
        ("q8+zstd+zstd", "stage 'zstd' appears twice"),
        ("fp16+q8", "has 2 value stages \\(fp16, q8\\)"),
        ("q8+q8", "appears twice"),
        ("topk:0.1+q8:channel", "cannot follow a sparse stage"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        parse_codec(spec)


def test_spec_must_be_a_string() -> None:
    with pytest.raises(CodecError, match="must be a string"):
        parse_codec(8)  # type: ignore[arg-type]


def test_stage_table_round_trip() -> None:
    codec = parse_codec("topk:0.25+q4:stochastic+zstd:5")
    table = codec.stage_table()
    assert table == [
        (16, struct.pack("<d", 0.25)),
        (9, bytes([0x02])),
        (32, bytes([5])),
    ]
    rebuilt = Codec.from_stage_table(table)
    assert rebuilt == codec
    assert Codec.from_stage_table(parse_codec("q2:channel,stochastic").stage_table()).spec == (
        "q2:channel,stochastic"
    )
    assert parse_codec("q2:channel,stochastic").stage_table() == [(10, b"\x03")]
    assert rebuilt.spec == codec.spec


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ([], "has no stages"),
        ([(32, b"\x01")], "names no value stage"),
        ([(16, struct.pack("<d", 0.1))], "names no value stage"),
        ([(32, b"\x01"), (8, b"\x00")], "cannot follow"),
        ([(8, b"\x00"), (8, b"\x00")], "appears twice"),
        ([(1, b""), (8, b"\x00")], "2 value stages"),
        ([(7, b"")], "unknown codec stage id 7"),
        ([(1, b"x")], "fp32 stage params must be empty"),
        ([(8, b"")], "q8 stage params must be 1 flags byte"),
        ([(8, b"\x00\x00")], "q8 stage params must be 1 flags byte"),
        ([(8, b"\x04")], "flags byte 0x04 has unknown bits"),
        ([(16, b"\x00" * 4), (1, b"")], "8-byte float64 fraction"),
        ([(16, struct.pack("<d", 0.0)), (1, b"")], "topk fraction must be in"),
        ([(16, struct.pack("<d", math.nan)), (1, b"")], "topk fraction must be in"),
        ([(16, struct.pack("<d", 1.0000001)), (1, b"")], "topk fraction must be in"),
        ([(1, b""), (32, b"")], "zstd stage params must be 1 level byte"),
        ([(1, b""), (32, b"\x00")], "zstd level must be in 1..22, got 0"),
        ([(1, b""), (32, b"\x17")], "zstd level must be in 1..22, got 23"),
        ([(16, struct.pack("<d", 0.5)), (8, b"\x01")], "cannot follow a sparse stage"),
    ],
)
def test_bad_stage_tables(table: list[tuple[int, bytes]], message: str) -> None:
    with pytest.raises(CodecError, match=message):
        Codec.from_stage_table(table)


def test_codec_constructor_validates() -> None:
    with pytest.raises(CodecError):
        Codec(())
    with pytest.raises(CodecError, match="cannot follow"):
        Codec((stage_by_name("zstd")(), Fp32()))  # type: ignore[call-arg]


def test_value_stage_kinds() -> None:
    for name in ("fp32", "fp16", "bf16", "q8", "q4", "q2", "q1"):
        assert issubclass(stage_by_name(name), ValueStage)


def test_seeded_codecs_are_reproducible() -> None:
    x = np.linspace(-1, 1, 101, dtype=np.float32)
    a = parse_codec("q2:stochastic", seed=3).encode(x)
    b = parse_codec("q2:stochastic", seed=3).encode(x)
    c = parse_codec("q2:stochastic", seed=4).encode(x)
    assert a == b
    assert a != c

"""Message encoding and tensor blobs/frames: round trips, strict rejection of every malformation, fuzz.

Tensor frames are not used on the peer bus (messages only); they stay for multipart replies off the bus.
"""
from __future__ import annotations

import math
import random
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest

from protocol import messages, tensors
from protocol.messages import (
    MAX_LIST_LEN,
    MAX_MESSAGE_BYTES,
    MAX_STRING_LEN,
    PROTOCOL_VERSION,
    Bye,
    Hello,
    Message,
    ProtocolError,
    Published,
    decode,
    encode,
    message_kinds,
    register_message,
)
from protocol.tensors import (
    DTYPES,
    RawTensor,
    blob_key,
    decode_blob,
    encode_blob,
    frame_tensors,
    itemsize,
    pack_header,
    unframe_tensors,
    unpack_header,
)


@register_message
@dataclass(frozen=True, kw_only=True)
class _Note(Message):
    """An extension kind, as another package would add one: exercises bool and tuple fields."""

    kind: ClassVar[str] = "test.note"
    tags: tuple[str, ...]
    weights: tuple[float, ...] = ()
    urgent: bool = False
    parent_seq: int | None = None


SAMPLES: list[Message] = [
    Hello(agent_id="agent-a", task="mnist5k", endpoint="tcp://127.0.0.1:40001", pid=4242,
          host="node-1", time=1_700_000_000.25),
    Published(agent_id="agent-a", task="mnist5k", model_id="agent-a:12", seq=99, score=0.8,
              quality=0.95),
    Published(agent_id="agent-a", task="mnist5k", model_id="agent-a:13", seq=100),
    Bye(agent_id="agent-a", task="mnist5k", reason="cycles done"),
    _Note(agent_id="agent-c", task="glyphs_greek", tags=("α", "β"), weights=(0.5, 2.0), urgent=True,
          parent_seq=7),
]
BUILTIN = [m for m in SAMPLES if not isinstance(m, _Note)]
PUBLISHED = next(m for m in SAMPLES if isinstance(m, Published) and m.score is not None)
BYE = next(m for m in SAMPLES if isinstance(m, Bye))


def wire_of(msg: Message) -> dict[str, Any]:
    return msgpack.unpackb(encode(msg), raw=False)


def pack(wire: Any) -> bytes:
    return msgpack.packb(wire, use_bin_type=True)


# ---------------------------------------------------------------------------------------------- messages


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: f"{m.kind}")
def test_every_kind_round_trips(msg: Message) -> None:
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE_BYTES
    wire = msgpack.unpackb(data, raw=False)
    assert wire["v"] == PROTOCOL_VERSION and wire["kind"] == msg.kind
    assert all(type(key) is str for key in wire)
    back = decode(data)
    assert type(back) is type(msg) and back == msg
    assert encode(back) == data  # canonical: decode then encode is byte-identical


def test_builtin_kinds_are_registered_and_time_defaults_to_now() -> None:
    kinds = message_kinds()
    for cls in (Hello, Published, Bye):
        assert kinds[cls.kind] is cls
    assert "heartbeat" not in kinds  # liveness is the lease in the store, never a message
    wire = {"v": PROTOCOL_VERSION, "kind": "heartbeat", "agent_id": "a", "task": "t", "time": 1.0,
            "cycle": 3, "generation": 17, "best_score": None}  # what an older peer may still send
    with pytest.raises(ProtocolError, match="heartbeat"):
        decode(pack(wire))
    msg = Bye(agent_id="a", task="t", reason="r")
    assert abs(msg.time - __import__("time").time()) < 60


def test_numbers_are_normalised_on_encode() -> None:
    msg = Published(agent_id="a", task="t", time=5, model_id="m", seq=np.int64(3), score=np.float32(0.5),
                    quality=1)
    back = decode(encode(msg))
    assert back.seq == 3 and type(back.seq) is int
    assert back.score == 0.5 and type(back.score) is float
    assert back.quality == 1.0 and type(back.quality) is float
    assert back.time == 5.0 and type(back.time) is float


def test_float_field_accepts_int_on_the_wire() -> None:
    wire = wire_of(PUBLISHED)
    wire["score"] = 1
    wire["time"] = 1_700_000_000
    back = decode(pack(wire))
    assert back.score == 1.0 and type(back.score) is float and type(back.time) is float


def _bad_values(annotation: Any) -> list[Any]:
    """Values that must be rejected for a field with this annotation."""
    optional = typing.get_origin(annotation) in (typing.Union, __import__("types").UnionType)
    base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
    by_type: dict[Any, list[Any]] = {
        str: [1, 1.5, True, b"bytes", ["x"], {"a": 1}, "x" * (MAX_STRING_LEN + 1)],
        int: [1.5, True, False, "1", b"1", [1], {"a": 1}],
        float: ["1.0", True, b"1", [1.0], {"a": 1.0}, math.nan, math.inf, -math.inf],
        bool: [0, 1, "true", 1.0, [True]],
    }
    if typing.get_origin(base) is tuple:
        inner = typing.get_args(base)[0]
        bad = ["abc", 3, {"a": 1}, [None], ["x"] * (MAX_LIST_LEN + 1)]
        if inner is str:
            bad.append([1])
        if inner is float:
            bad.append(["x"])
        return bad if optional else bad + [None]
    bad = list(by_type[base])
    return [v for v in bad if v is not None] if optional else bad + [None]


FIELD_CASES = [
    (sample, fld.name, bad)
    for sample in {type(s): s for s in SAMPLES}.values()
    for fld in fields(sample)
    for bad in _bad_values(typing.get_type_hints(type(sample))[fld.name])
]


@pytest.mark.parametrize("sample,name,bad", FIELD_CASES,
                         ids=[f"{s.kind}.{n}-{i}" for i, (s, n, _) in enumerate(FIELD_CASES)])
def test_every_field_type_violation_is_rejected(sample: Message, name: str, bad: Any) -> None:
    wire = wire_of(sample)
    wire[name] = bad
    # Binary values and overlong lists are already refused by the bounded msgpack parser.
    with pytest.raises(ProtocolError, match=f"{name}|not a valid msgpack payload"):
        decode(pack(wire))
    with pytest.raises(ProtocolError):  # and the sender side refuses to produce it
        encode(type(sample)(**{**{f.name: getattr(sample, f.name) for f in fields(sample)}, name: bad}))


@pytest.mark.parametrize("sample", BUILTIN, ids=lambda m: m.kind)
def test_every_missing_key_is_rejected(sample: Message) -> None:
    for key in wire_of(sample):
        wire = wire_of(sample)
        del wire[key]
        with pytest.raises(ProtocolError):
            decode(pack(wire))


@pytest.mark.parametrize("sample", BUILTIN, ids=lambda m: m.kind)
def test_extra_field_is_rejected(sample: Message) -> None:
    wire = wire_of(sample)
    wire["surprise"] = 1
    with pytest.raises(ProtocolError, match="unexpected fields"):
        decode(pack(wire))


@pytest.mark.parametrize("version", [0, 2, -1, "1", 1.0, True, None, [1]])
def test_wrong_protocol_version_is_rejected(version: Any) -> None:
    wire = wire_of(SAMPLES[0])
    wire["v"] = version
    with pytest.raises(ProtocolError, match="version"):
        decode(pack(wire))


@pytest.mark.parametrize("kind", ["nope", "", "HELLO", 7, None, b"hello", ["hello"]])
def test_unknown_or_malformed_kind_is_rejected(kind: Any) -> None:
    wire = wire_of(SAMPLES[0])
    wire["kind"] = kind
    with pytest.raises(ProtocolError, match="kind|not a valid msgpack payload"):
        decode(pack(wire))


@pytest.mark.parametrize("key", [1, b"agent_id", 1.5, None])
def test_non_string_map_key_is_rejected(key: Any) -> None:
    wire: dict[Any, Any] = wire_of(BYE)
    wire[key] = "x"
    with pytest.raises(ProtocolError):
        decode(pack(wire))


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", pack([1, 2, 3]), pack("hello"), pack(7), pack(None), pack({}),
    encode(SAMPLES[0]) + b"\x00",  # trailing bytes after a valid map
    encode(SAMPLES[0])[:-1],  # truncated
    pack({"v": 1, "kind": "bye", "nested": [[[[[]]]]] * 3}),
    b"\x91" * 5000,  # deep nesting
    msgpack.packb(msgpack.ExtType(5, b"xyz")),
    pack({"v": 1, "kind": "bye", "agent_id": b"a", "task": "t", "time": 1.0, "reason": "r"}),
])
def test_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode(payload)


@pytest.mark.parametrize("thing", ["a string", None, 12, [b"x"], bytearray(b"\x80")])
def test_decode_of_non_bytes_or_junk_raises_protocol_error(thing: Any) -> None:
    with pytest.raises(ProtocolError):
        decode(thing)


def test_oversize_payload_is_rejected_before_parsing() -> None:
    wire = wire_of(BYE)
    wire["reason"] = "x" * MAX_MESSAGE_BYTES
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(pack(wire))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(memoryview(b"\x00" * (MAX_MESSAGE_BYTES + 1)))


def test_encode_rejects_oversize_and_unregistered() -> None:
    # Strings within the per-field bound can still add up past the payload bound.
    big = _Note(agent_id="a", task="t", tags=tuple("y" * MAX_STRING_LEN for _ in range(20)))
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(big)

    @dataclass(frozen=True, kw_only=True)
    class Unregistered(Message):
        kind: ClassVar[str] = "unregistered"

    with pytest.raises(ProtocolError, match="not a registered"):
        encode(Unregistered(agent_id="a", task="t"))
    with pytest.raises(ProtocolError, match="cannot encode"):
        encode(Bye(agent_id="a", task="t", reason="\ud800"))  # lone surrogate: not UTF-8


def test_register_message_refuses_bad_definitions() -> None:
    with pytest.raises(ValueError, match="already registered"):
        @register_message
        @dataclass(frozen=True, kw_only=True)
        class Clash(Message):
            kind: ClassVar[str] = "hello"

    with pytest.raises(TypeError, match="frozen"):
        @register_message
        @dataclass(kw_only=True)
        class Mutable(Message):
            kind: ClassVar[str] = "test.mutable"

    with pytest.raises(TypeError, match="unsupported field type"):
        @register_message
        @dataclass(frozen=True, kw_only=True)
        class Mapped(Message):
            kind: ClassVar[str] = "test.mapped"
            table: dict[str, int]

    with pytest.raises(ValueError, match="reserved"):
        @register_message
        @dataclass(frozen=True, kw_only=True)
        class Versioned(Message):
            kind: ClassVar[str] = "test.versioned"
            v: int

    with pytest.raises(ValueError, match="kind must match"):
        @register_message
        @dataclass(frozen=True, kw_only=True)
        class BadKind(Message):
            kind: ClassVar[str] = "Bad Kind"

    assert set(message_kinds()) >= {"hello", "published", "bye", "test.note"}
    assert not {"test.mutable", "test.mapped", "test.versioned"} & set(message_kinds())


def test_decode_fuzz_only_protocol_error_escapes() -> None:
    """Random bytes, random msgpack structures and mutations of valid payloads never crash decode."""
    rng = random.Random(20240611)
    valid_payloads = [encode(m) for m in SAMPLES]
    field_names = sorted({f.name for m in SAMPLES for f in fields(m)} | {"v", "kind"})
    outcomes = {"rejected": 0, "accepted": 0}

    def check(data: bytes) -> None:
        try:
            msg = decode(data)
        except ProtocolError:
            outcomes["rejected"] += 1
            return
        # A mutation may land on another valid message; then it must be a fully valid one.
        assert isinstance(msg, tuple(message_kinds().values()))
        assert decode(encode(msg)) == msg
        outcomes["accepted"] += 1

    def random_value(depth: int = 0) -> Any:
        choice = rng.randrange(9 if depth < 3 else 6)
        return [
            lambda: rng.randint(-(2**63), 2**64 - 1), lambda: rng.random() * 1e6, lambda: None,
            lambda: rng.choice([True, False]), lambda: rng.choice(["", "hello", "bye", "x" * 70]),
            lambda: rng.randbytes(rng.randrange(8)),
            lambda: [random_value(depth + 1) for _ in range(rng.randrange(4))],
            lambda: {rng.choice(field_names): random_value(depth + 1) for _ in range(rng.randrange(4))},
            lambda: {rng.randrange(3): 1},
        ][choice]()

    for _ in range(3000):
        check(rng.randbytes(rng.randrange(0, 200)))
    for _ in range(2000):
        wire = wire_of(rng.choice(SAMPLES))
        for _ in range(rng.randrange(1, 3)):
            wire[rng.choice(field_names)] = random_value()
        check(msgpack.packb(wire, use_bin_type=True))
    for _ in range(5000):
        data = bytearray(rng.choice(valid_payloads))
        for _ in range(rng.randrange(1, 4)):
            op = rng.randrange(4)
            pos = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                del data[pos:]
            elif op == 2:
                data[pos:pos] = rng.randbytes(rng.randrange(1, 6))
            else:
                del data[pos:pos + rng.randrange(1, 6)]
        check(bytes(data))
    assert outcomes["rejected"] > 9000  # overwhelmingly junk; the rest decoded to valid messages


# ----------------------------------------------------------------------------------------------- tensors


NUMPY_DTYPES = [name for name, (_, np_name) in DTYPES.items() if np_name]
SHAPES = [(), (0,), (5,), (2, 3), (0, 4, 5), (1,) * 8]


def _random_array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype.startswith("float"):
        return rng.standard_normal(size=shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_blob_and_frame_round_trip(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(7)
    array = _random_array(dtype, shape, rng)
    tensor = RawTensor.from_numpy(array)
    assert (tensor.dtype, tensor.shape, tensor.nbytes) == (dtype, shape, array.nbytes)
    assert tensor.nbytes == tensor.numel * itemsize(dtype)
    np.testing.assert_array_equal(tensor.to_numpy(), array)

    blob = encode_blob(tensor)
    back = decode_blob(blob)
    assert back == tensor and back.to_numpy().shape == shape
    np.testing.assert_array_equal(back.to_numpy(), array)
    assert blob_key(back) == blob_key(tensor)

    framed = unframe_tensors(frame_tensors({"w": tensor}))
    assert list(framed) == ["w"] and framed["w"] == tensor


def test_from_numpy_normalises_byte_order_and_layout() -> None:
    native = np.arange(12, dtype=np.float32).reshape(3, 4)
    big_endian = native.astype(">f4")
    transposed = np.ascontiguousarray(native.T).T  # Fortran-ordered view with the same values
    assert not transposed.flags.c_contiguous
    reference = RawTensor.from_numpy(native)
    assert RawTensor.from_numpy(big_endian) == reference
    assert RawTensor.from_numpy(transposed) == reference
    assert bytes(reference.data) == native.astype("<f4").tobytes()
    assert RawTensor.from_numpy(np.float64(2.5)).shape == ()


def test_unsupported_numpy_dtypes_are_rejected() -> None:
    for array in (np.zeros(2, np.uint16), np.zeros(2, np.complex64), np.array(["a"]), np.array([None])):
        with pytest.raises(ProtocolError, match="unsupported numpy dtype"):
            RawTensor.from_numpy(array)


def test_bfloat16_travels_as_raw_bytes() -> None:
    # bfloat16 is the top half of a float32: 1.0 -> 0x3F80, -2.0 -> 0xC000.
    raw = np.array([0x3F80, 0xC000, 0, 0x7F80], dtype="<u2").tobytes()
    tensor = RawTensor("bfloat16", (2, 2), raw)
    back = decode_blob(encode_blob(tensor))
    assert back == tensor and bytes(back.data) == raw
    assert unframe_tensors(frame_tensors({"b": tensor}))["b"] == tensor
    assert blob_key(back) != blob_key(RawTensor("float16", (2, 2), raw))
    with pytest.raises(ProtocolError, match="no numpy dtype"):
        tensor.to_numpy()
    as_float32 = (np.frombuffer(back.data, "<u2").astype("<u4") << 16).view("<f4")
    np.testing.assert_array_equal(as_float32, [1.0, -2.0, 0.0, np.inf])


def test_decode_blob_is_zero_copy() -> None:
    blob = bytearray(encode_blob(RawTensor.from_numpy(np.arange(4, dtype=np.int32))))
    tensor = decode_blob(blob)
    assert isinstance(tensor.data, memoryview) and tensor.data.obj is blob
    blob[-4:] = (99).to_bytes(4, "little")  # writes through to the decoded view
    assert tensor.to_numpy()[-1] == 99


def test_content_address_equality_and_inequality() -> None:
    data = np.arange(6, dtype=np.float32).tobytes()
    base = RawTensor("float32", (2, 3), data)
    assert blob_key(base) == blob_key(RawTensor("float32", (2, 3), memoryview(bytearray(data))))
    assert blob_key(base) == blob_key(decode_blob(encode_blob(base)))
    different = [
        RawTensor("int32", (2, 3), data),  # same bytes, other dtype
        RawTensor("float32", (3, 2), data),  # same bytes, other shape
        RawTensor("float32", (6,), data),
        RawTensor("float32", (2, 3), data[:-1] + b"\x01"),  # one byte differs
    ]
    keys = {blob_key(t) for t in [base, *different]}
    assert len(keys) == 5
    assert all(len(k) == 64 and int(k, 16) >= 0 for k in keys)


@pytest.mark.parametrize("dtype,shape,data,match", [
    ("float32", (2,), b"\x00" * 7, "needs 8"),
    ("float32", (2,), b"\x00" * 9, "needs 8"),
    ("complex64", (1,), b"\x00" * 8, "unsupported tensor dtype"),
    ("float32", (-1,), b"", "dimension"),
    ("float32", (2.0,), b"\x00" * 8, "dimension"),
    ("float32", (True,), b"\x00" * 4, "dimension"),
    ("uint8", (1,) * 9, b"\x00", "rank"),
    ("uint8", "ab", b"\x00" * 2, "shape"),
    ("uint8", (1,), "a", "must be bytes"),
])
def test_invalid_raw_tensors_are_rejected(dtype: str, shape: Any, data: Any, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        RawTensor(dtype, shape, data)


def _header_with_body(body: bytes) -> bytes:
    return len(body).to_bytes(4, "little") + body


@pytest.mark.parametrize("buf,match", [
    (b"", "no length prefix"),
    (b"\x05\x00", "no length prefix"),
    ((10_000).to_bytes(4, "little") + b"\x00" * 10_000, "exceeds"),
    (_header_with_body(pack({"dtype": "float32", "shape": [1]}))[:-1], "truncated"),
    (_header_with_body(b"\xc1\xc1"), "not valid msgpack"),
    (_header_with_body(pack(["float32", [1]])), "exactly 'dtype' and 'shape'"),
    (_header_with_body(pack({"dtype": "float32"})), "exactly 'dtype' and 'shape'"),
    (_header_with_body(pack({"dtype": "float32", "shape": [1], "x": 1})), "not valid msgpack|exactly"),
    (_header_with_body(pack({"dtype": "float31", "shape": [1]})), "unsupported tensor dtype"),
    (_header_with_body(pack({"dtype": 4, "shape": [1]})), "dtype must be a string"),
    (_header_with_body(pack({"dtype": "float32", "shape": [-3]})), "dimension"),
    (_header_with_body(pack({"dtype": "float32", "shape": 3})), "shape"),
    (_header_with_body(pack({"shape": [1], "dtype": "float32"})), "canonical"),  # reordered keys
    (_header_with_body(msgpack.packb({"dtype": "float32", "shape": [1]}, use_single_float=False)
                       .replace(b"\x91\x01", b"\x91\xcc\x01")), "canonical"),  # widened int
])
def test_bad_headers_are_rejected(buf: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unpack_header(buf)
    with pytest.raises(ProtocolError):
        decode_blob(buf + b"\x00" * 4)


def test_blob_with_wrong_payload_length_is_rejected() -> None:
    blob = encode_blob(RawTensor("int16", (3,), b"\x01\x00\x02\x00\x03\x00"))
    with pytest.raises(ProtocolError, match="needs 6"):
        decode_blob(blob[:-1])
    with pytest.raises(ProtocolError, match="needs 6"):
        decode_blob(blob + b"\x00")
    dtype, shape, header_len = unpack_header(blob)
    assert (dtype, shape) == ("int16", (3,)) and blob[:header_len] == pack_header("int16", [3])


def test_blob_mutation_fuzz_only_protocol_error_escapes() -> None:
    rng = random.Random(99)
    blobs = [encode_blob(RawTensor.from_numpy(_random_array(d, s, np.random.default_rng(1))))
             for d in ("float32", "int8", "bool") for s in ((), (3, 2), (0, 2))]
    decoded = 0
    for _ in range(3000):
        data = bytearray(rng.choice(blobs))
        pos = rng.randrange(len(data))
        if rng.random() < 0.5:
            data[pos] = rng.randrange(256)
        else:
            del data[pos:pos + rng.randrange(1, 4)]
        try:
            tensor = decode_blob(bytes(data))
        except ProtocolError:
            continue
        decoded += 1  # flipping a data byte (not the header) still gives a valid tensor
        assert tensor.nbytes == tensor.numel * itemsize(tensor.dtype)
    assert 0 < decoded < 3000


def test_frames_round_trip_many_tensors_in_order() -> None:
    rng = np.random.default_rng(3)
    named = {
        "blocks.0.attn.qkv.weight": RawTensor.from_numpy(rng.standard_normal((6, 2)).astype(np.float32)),
        "scalar": RawTensor.from_numpy(np.int64(-5)),
        "empty": RawTensor.from_numpy(np.zeros((0, 3), np.float16)),
        "bf16": RawTensor("bfloat16", (1,), b"\x80\x3f"),
    }
    frames = frame_tensors(named)
    assert len(frames) == 5
    assert all(frame is tensor.data for frame, tensor in zip(frames[1:], named.values()))  # no copies
    back = unframe_tensors([memoryview(bytes(f)) for f in frames])
    assert list(back) == list(named) and back == named
    assert unframe_tensors(frame_tensors({})) == {}


def _index(entries: Any, v: Any = PROTOCOL_VERSION) -> bytes:
    return pack({"v": v, "tensors": entries})


@pytest.mark.parametrize("frames,match", [
    ([], "missing their index"),
    ([b"\xc1"], "not valid msgpack"),
    ([pack([1, 2])], "exactly 'v' and 'tensors'"),
    ([_index([], v=2)], "version"),
    ([_index([], v=True)], "version"),
    ([_index({"a": 1})], "must be a list"),
    ([_index([["a", "uint8", [1]]])], "1 tensors but 0 frames"),
    ([_index([]), b"x"], "0 tensors but 1 frames"),
    ([_index([["a", "uint8"]]), b"x"], r"\[name, dtype, shape\]"),
    ([_index(["a"]), b"x"], r"\[name, dtype, shape\]"),
    ([_index([["", "uint8", [1]]]), b"x"], "non-empty"),
    ([_index([[7, "uint8", [1]]]), b"x"], "non-empty"),
    ([_index([["a", "uint8", [1]], ["a", "uint8", [1]]]), b"x", b"y"], "twice"),
    ([_index([["a", 5, [1]]]), b"x"], "dtype must be a string"),
    ([_index([["a", "uint9", [1]]]), b"x"], "unsupported"),
    ([_index([["a", "uint8", [2]]]), b"x"], "needs 2"),
    ([_index([["a", "uint8", [1, -1]]]), b""], "dimension"),
    ([_index([["a", "uint8", [1]]]), "x"], "not bytes"),
])
def test_bad_tensor_frames_are_rejected(frames: list[Any], match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        unframe_tensors(frames)


def test_frame_tensors_rejects_bad_input() -> None:
    good = RawTensor("uint8", (1,), b"\x00")
    with pytest.raises(ProtocolError, match="non-empty"):
        frame_tensors({"": good})
    with pytest.raises(ProtocolError, match="not a RawTensor"):
        frame_tensors({"a": np.zeros(1)})  # type: ignore[dict-item]
    assert messages.ProtocolError is tensors.ProtocolError

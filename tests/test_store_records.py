"""Records: round trips through plain dicts and msgpack, strict decoding, component writes."""
from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest

from protocol.tensors import RawTensor, blob_key
from store import (AgentRecord, AgentState, ComponentRecord, ComponentWrite, Event, ModelRecord,
                   StoreCorrupt, StoreError, TaskRecord, TrialRecord, component_id,
                   parse_component_id)
from store.codec import decode_seq_key, pack_value, seq_key, unpack_value

SAMPLES = [
    ComponentRecord(id="a:3", name="encoderblock_2", agent="a", tensors={"w": "k1", "b": "k2"},
                    momentum={"w": "k3"}, created_at=1.5, cloned_from="root:2"),
    ModelRecord(id="a:m1", task="mnist", agent="a", components=["root:0", "a:3"],
                hparams={"num_layers": 3, "opt_lr": 0.01, "adapter_layers": "0_2",
                         "opt_nesterov": False, "x": None},
                metrics={"quality": 0.9, "score": float("nan")}, parent="root:m0",
                preset="demo", preset_hash="abc", created_at=2.0),
    TaskRecord(task="mnist", model_id="a:m1", agent="a", num_classes=10,
               data_spec={"ds_image_size": 32, "source": {"name": "mnist", "splits": [1, 2]}},
               updated_at=3.0),
    AgentRecord(agent_id="a", task="mnist", host="h", pid=12, device="cpu", endpoint="tcp://x:1",
                preset="demo", lease_token="tok", lease_expiry=9.0, heartbeat_at=8.0,
                state="running", progress={"cycle": 2, "best_score": 0.5, "children": 7}),
    AgentState(agent_id="a", task="mnist", cycle=2, generation=5, population=["a:m1"],
               best_model_id="a:m1", next_component_id=4, next_model_id=2,
               offsprings={"a:m1": 3}, updated_at=4.0, cycle_images=1536),
    TrialRecord(id="a:t1", agent="a", task="mnist", cycle=2, generation=5, parent="root:m0",
                model_id=None, mutations=["hp:opt_lr", "clone:head"],
                hparams_diff={"opt_lr": [0.01, 0.02]}, quality=0.8, score=None, accepted=False,
                seconds=1.25, train_images=512, preset="demo", preset_hash="abc",
                created_at=5.0, evals=[0.5, 0.8], threshold=0.85, lowest_trainable="encoderblock_2",
                image_size=48, augment=["flip"], flops={"train": 3, "validation": 2, "cache_fill": 1,
                                                        "total": 6}, stopped="hurdle"),
    Event(seq=7, kind="published", task="mnist", agent="a", model_id="a:m1", time=6.0,
          data={"score": 0.5}),
]


def _same(a: object, b: object) -> bool:
    """Equality that treats NaN as equal (records may carry NaN metrics)."""
    return pack_value(a.to_dict()) == pack_value(b.to_dict())


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_round_trip_through_dict_and_msgpack(record):
    as_dict = record.to_dict()
    assert all(isinstance(k, str) for k in as_dict)
    again = type(record).from_dict(unpack_value(pack_value(as_dict), "test"))
    assert _same(again, record)
    if not any(isinstance(v, float) and math.isnan(v) for v in as_dict.get("metrics", {}).values()):
        assert again == record


@pytest.mark.parametrize("record", SAMPLES, ids=lambda r: type(r).__name__)
def test_strict_decode_rejects_missing_extra_and_wrong_types(record):
    cls, good = type(record), record.to_dict()
    first = next(iter(good))
    with pytest.raises(StoreCorrupt, match="missing"):
        cls.from_dict({k: v for k, v in good.items() if k != first})
    with pytest.raises(StoreCorrupt, match="unexpected"):
        cls.from_dict({**good, "surprise": 1})
    with pytest.raises(StoreCorrupt):
        cls.from_dict([good])
    for name, value in good.items():
        # a dict is wrong for every field that is not itself a dict, and vice versa
        wrong = 17 if isinstance(value, dict) else {"nested": "map"}
        with pytest.raises(StoreCorrupt, match=name):
            cls.from_dict({**good, name: wrong})


def test_an_agent_state_written_with_the_retired_extra_field_still_loads():
    """States written before ``AgentState.extra`` was removed carry it: it is accepted and dropped."""
    state = next(r for r in SAMPLES if isinstance(r, AgentState))
    old = {**state.to_dict(), "extra": {"rng": b"\x00\x01", "l": [1, 2]}}
    loaded = AgentState.from_dict(unpack_value(pack_value(old), "test"))
    assert loaded == state and "extra" not in loaded.to_dict()
    assert not hasattr(loaded, "extra")
    with pytest.raises(StoreCorrupt, match="unexpected"):  # only that one retired name is forgiven
        AgentState.from_dict({**old, "surprise": 1})
    with pytest.raises(TypeError):
        AgentState(**old)  # the constructor no longer takes it


@pytest.mark.parametrize("cls", [TrialRecord, AgentState])
def test_records_written_before_fields_were_added_load_with_their_defaults(cls):
    """Trials gained learning curves and FLOPs, agent states a cycle's image count (issue 16): a
    store written before them still opens, and the added fields read as 'not recorded'."""
    record = next(r for r in SAMPLES if isinstance(r, cls))
    old = {k: v for k, v in record.to_dict().items() if k not in cls._ADDED}
    loaded = cls.from_dict(unpack_value(pack_value(old), "test"))
    assert {k: getattr(loaded, k) for k in cls._ADDED} == cls._ADDED
    assert loaded.to_dict() == {**record.to_dict(), **cls._ADDED}
    with pytest.raises(StoreCorrupt, match="evals|cycle_images"):  # an added field still type-checks
        cls.from_dict({**old, next(iter(cls._ADDED)): "not a value of its type"})


def test_int_and_float_fields_are_strict_about_bool_and_str():
    good = SAMPLES[3].to_dict()  # AgentRecord
    with pytest.raises(StoreCorrupt, match="pid"):
        AgentRecord.from_dict({**good, "pid": True})
    with pytest.raises(StoreCorrupt, match="lease_expiry"):
        AgentRecord.from_dict({**good, "lease_expiry": "9"})
    # an int where a float is expected is accepted and normalised (msgpack keeps 9.0 vs 9 apart)
    assert AgentRecord.from_dict({**good, "lease_expiry": 9}).lease_expiry == 9.0


def test_model_hparams_must_be_flat_scalars():
    good = SAMPLES[1].to_dict()
    with pytest.raises(StoreCorrupt, match="hparams"):
        ModelRecord.from_dict({**good, "hparams": {"nested": {"a": 1}}})
    with pytest.raises(StoreCorrupt, match="components"):
        ModelRecord.from_dict({**good, "components": ["ok", 3]})
    with pytest.raises(StoreCorrupt, match="id"):
        ModelRecord.from_dict({**good, "id": ""})


def test_validated_raises_store_error_not_corrupt_for_bad_writes():
    bad = ModelRecord(id="a:m1", task="t", agent="a", components=[], hparams={"x": [1, 2]},
                      metrics={}, parent=None, preset="p", preset_hash="h", created_at=0.0)
    with pytest.raises(StoreError, match="hparams") as info:
        bad.validated()
    assert not isinstance(info.value, StoreCorrupt)


def test_component_ids():
    assert component_id("agent_x", 4) == "agent_x:4"
    assert parse_component_id("glyphs_greek:12") == ("glyphs_greek", 12)
    assert parse_component_id("a:b:3") == ("a:b", 3)
    for bad in ("nocolon", ":3", "a:", "a:x"):
        with pytest.raises(ValueError):
            parse_component_id(bad)


def test_component_write_build_fills_and_resolved_checks_blob_keys():
    w = RawTensor.from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    m = RawTensor.from_numpy(np.ones((2, 3), dtype=np.float32))
    built = ComponentWrite.build("a:0", "head", "a", {"weight": w}, {"weight": m})
    assert built.record.tensors == {"weight": blob_key(w)}
    record, blobs = built.resolved()
    assert record.momentum == {"weight": blob_key(m)} and set(blobs) == {blob_key(w), blob_key(m)}

    # empty dicts in the record are filled in by the store
    bare = ComponentRecord(id="a:0", name="head", agent="a", tensors={}, momentum={},
                           created_at=1.0, cloned_from=None)
    record, _ = ComponentWrite(bare, {"weight": w}).resolved()
    assert record.tensors == {"weight": blob_key(w)} and record.momentum == {}

    # a record whose keys disagree with the tensors is refused
    lying = ComponentRecord(id="a:0", name="head", agent="a", tensors={"weight": blob_key(m)},
                            momentum={}, created_at=1.0, cloned_from=None)
    with pytest.raises(StoreError, match="does not match"):
        ComponentWrite(lying, {"weight": w}).resolved()


def test_canonical_encoding_ignores_dict_order_and_seq_keys_sort_numerically():
    assert pack_value({"a": 1, "b": {"y": 1, "x": 2}}) == pack_value({"b": {"x": 2, "y": 1}, "a": 1})
    keys = [seq_key(n) for n in (1, 255, 256, 65536, 2**40)]
    assert keys == sorted(keys)
    assert [decode_seq_key(k) for k in keys] == [1, 255, 256, 65536, 2**40]
    with pytest.raises(StoreCorrupt):
        unpack_value(b"\xc1garbage", "x")
    assert msgpack.unpackb(pack_value({"t": (1, 2)})) == {"t": [1, 2]}

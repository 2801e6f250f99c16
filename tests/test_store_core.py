"""Store invariants (docs/design.md section 4) on a real LMDB store in tmp_path, one process."""
from __future__ import annotations

import os
import pickle
import time

import lmdb
import numpy as np
import pytest

from protocol.tensors import blob_key, encode_blob
from store import (AgentState, ComponentWrite, Conflict, LeaseLost, MissingReference, Publication,
                   ModelRecord, NotAStore, Store, StoreError, StoreFull, component_id)
from store.codec import pack_value
from store.env import DEFAULT_MAP_SIZE, parse_size, resolve_map_size
from helpers.store_records import (check_model_integrity, child_model, child_writes, lease, make_root, pub,
                                   publish_next, random_tensor, rt)


@pytest.fixture
def st(tmp_path):
    with Store.open(tmp_path / "store", create=True) as store:
        yield store


@pytest.fixture
def root(st):
    return make_root(st)


def _counts(st: Store) -> dict[str, int]:
    return st.stats()["counts"]


# ---- opening ---------------------------------------------------------------------------------

def test_create_writes_meta_and_reopen_keeps_it(tmp_path):
    path = tmp_path / "s"
    with Store.open(path, create=True) as st:
        meta = st.meta()
        assert meta["schema_version"] == 1 and meta["root_model_id"] is None
        assert meta["config"] == {}
    assert sorted(os.listdir(path)) == ["data.mdb", "lock.mdb"]
    with Store.open(path, readonly=True) as st:
        assert st.meta() == meta
    with Store.open(path, create=True) as st:  # create on an existing store only opens it
        assert st.meta() == meta


def test_not_a_store_creates_nothing(tmp_path):
    missing = tmp_path / "missing"
    for readonly in (True, False):
        with pytest.raises(NotAStore, match="missing"):
            Store.open(missing, readonly=readonly)
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(NotAStore):
        Store.open(empty)
    assert os.listdir(empty) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(NotAStore, match="not a directory"):
        Store.open(a_file)
    # an LMDB environment that is not a munet-swarm store
    foreign = tmp_path / "foreign"
    env = lmdb.open(str(foreign), map_size=2**20)
    with env.begin(write=True) as txn:
        txn.put(b"k", b"v")
    env.close()
    with pytest.raises(NotAStore, match="foreign"):
        Store.open(foreign, readonly=True)
    assert len(str(NotAStore("/x")).splitlines()) == 1


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "s"
    Store.open(path, create=True).close()
    env = lmdb.open(str(path), max_dbs=16, map_size=2**30)
    meta_db = env.open_db(b"meta")
    with env.begin(write=True) as txn:
        txn.put(b"meta", pack_value({"schema_version": 99, "created_at": 0.0,
                                     "root_model_id": None, "config": {}}), db=meta_db)
    env.close()
    with pytest.raises(StoreError, match="schema version 99"):
        Store.open(path, readonly=True)


def test_map_size_parsing(monkeypatch):
    assert parse_size("8G") == 8 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1048576") == 2**20 and parse_size("1.5M") == 1536 * 2**10
    with pytest.raises(StoreError):
        parse_size("lots")
    monkeypatch.delenv("MUNET_STORE_MAP_SIZE", raising=False)
    assert resolve_map_size(None) == DEFAULT_MAP_SIZE == 64 * 2**30
    monkeypatch.setenv("MUNET_STORE_MAP_SIZE", "2G")
    assert resolve_map_size(None) == 2 * 2**30
    assert resolve_map_size(2**20) == 2**20


def test_store_is_unpicklable_and_bound_to_its_process(st, monkeypatch):
    with pytest.raises(StoreError, match="cannot be pickled"):
        pickle.dumps(st)
    real_pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: real_pid + 1)  # as if we were a forked child
    with pytest.raises(StoreError, match="opened in process"):
        st.meta()
    monkeypatch.setattr(os, "getpid", lambda: real_pid)
    assert st.meta()["schema_version"] == 1


def test_readonly_store_refuses_writes(tmp_path, st):
    with Store.open(st.path, readonly=True) as ro:
        with pytest.raises(StoreError, match="read-only"):
            make_root(ro)
        with pytest.raises(StoreError, match="read-only"):
            lease(ro, "a", "t1")
        with pytest.raises(StoreError, match="read-only"):
            ro.gc(grace_seconds=0)
    assert st.root_model_id() is None and st.agents() == [] and st.last_event_seq() == 0


# ---- root ------------------------------------------------------------------------------------

def test_ensure_root_is_write_once(st, root):
    assert st.root_model_id() == root.id
    other = ModelRecord(id="root:m9", task="root", agent="root", components=[], hparams={},
                        metrics={}, parent=None, preset="p", preset_hash="h", created_at=0.0)
    assert st.ensure_root(other, []) == root.id  # already set: nothing else happens
    assert st.get_model("root:m9") is None
    assert [e.kind for e in st.events()] == ["root"]
    assert check_model_integrity(st, root.id) == 2 * len(root.components)


# ---- commit: atomicity, immutability, ownership, dedup ----------------------------------------

def test_commit_publishes_everything_in_one_step(st, root):
    token = lease(st, "a", "t1")
    seq = publish_next(st, "a", token, "t1", 0, root, np.random.default_rng(0))
    model = st.published_models()["t1"]
    assert model.id == "a:m0" and seq == st.last_event_seq() == 2
    pointer = st.get_task("t1")
    assert pointer.num_classes == 3 and pointer.data_spec == {"ds_image_size": 32}
    assert pointer.agent == "a"
    assert st.get_agent_state("a").population == ["a:m0"]
    assert [t.id for t in st.trials(task="t1")] == ["a:t0"]
    assert st.events(after=1)[0].data == {"score": model.metrics["score"]}
    check_model_integrity(st, model.id)
    assert st.verify() == []


def test_commit_with_missing_component_writes_nothing(st, root):
    token = lease(st, "a", "t1")
    rng = np.random.default_rng(0)
    writes = child_writes("a", 0, rng)
    model = child_model("a", "t1", 0, writes, root, None)
    bad = ModelRecord(**{**model.to_dict(), "components": [*model.components, "a:77"]})
    before = _counts(st)
    with pytest.raises(MissingReference, match="a:77"):
        st.commit("a", token, components=writes, models=[bad], publish=pub(bad))
    assert _counts(st) == before  # not even the blobs or components of the failed commit
    assert st.get_task("t1") is None and st.verify() == []


def test_publish_needs_an_existing_model_of_the_agents_task(st, root):
    token = lease(st, "a", "t1")
    with pytest.raises(MissingReference):
        st.commit("a", token, publish=Publication("a:m5", 3))
    with pytest.raises(Conflict, match="task"):
        st.commit("a", token, publish=Publication(root.id, 3))
    assert st.last_event_seq() == 1


def test_components_and_models_are_immutable(st, root):
    token = lease(st, "a", "t1")
    rng = np.random.default_rng(0)
    writes = child_writes("a", 0, rng)
    model = child_model("a", "t1", 0, writes, root, None)
    st.commit("a", token, components=writes, models=[model])
    st.commit("a", token, components=writes, models=[model])  # identical rewrite: a no-op
    changed = ComponentWrite.build(writes[0].record.id, "head", "a",
                                   {"weight": random_tensor(rng, 3, 3)})
    with pytest.raises(Conflict, match="immutable"):
        st.commit("a", token, components=[changed])
    other_model = ModelRecord(**{**model.to_dict(), "metrics": {"score": 1.0}})
    before = _counts(st)
    with pytest.raises(Conflict, match="immutable"):
        st.commit("a", token, models=[other_model], publish=pub(model))
    assert _counts(st) == before and st.get_task("t1") is None
    assert st.get_model(model.id) == model.validated()


def test_each_agent_writes_only_its_own_records(st, root):
    token_a = lease(st, "a", "t1")
    lease(st, "b", "t2")
    rng = np.random.default_rng(0)
    b_writes = child_writes("b", 0, rng)
    with pytest.raises(Conflict, match="one writer"):
        st.commit("a", token_a, components=b_writes)
    disguised = ComponentWrite.build("b:5", "head", "a", {"w": rt(np.ones(2))})
    with pytest.raises(Conflict, match="one writer"):
        st.commit("a", token_a, components=[disguised])
    a_writes = child_writes("a", 0, rng)
    b_model = child_model("b", "t2", 0, a_writes, root, None)
    with pytest.raises(Conflict, match="own records"):
        st.commit("a", token_a, components=a_writes, models=[b_model])
    wrong_task = child_model("a", "t2", 0, a_writes, root, None)
    with pytest.raises(Conflict, match="serves task"):
        st.commit("a", token_a, components=a_writes, models=[wrong_task])
    with pytest.raises(LeaseLost):
        st.commit("a", "not-the-token", components=a_writes)
    with pytest.raises(LeaseLost):
        st.commit("nobody", "x")
    assert _counts(st)["components"] == len(root.components)


def test_identical_tensors_are_stored_once(st, root):
    token = lease(st, "a", "t1")
    shared = random_tensor(np.random.default_rng(1), 32, 32)
    writes = [ComponentWrite.build(component_id("a", i), "head", "a", {"weight": shared},
                                   {"weight": shared}) for i in range(3)]
    before = _counts(st)["blobs"]
    st.commit("a", token, components=writes)
    assert _counts(st)["blobs"] == before + 1
    assert all(w.record.tensors["weight"] == blob_key(shared) for w in writes)
    params, momentum = st.load_component_tensors("a:2")
    assert bytes(params["weight"].data) == bytes(shared.data) == bytes(momentum["weight"].data)


def test_loaded_tensors_outlive_the_transaction(st, root):
    loaded = st.load_model_tensors(root.id)
    st.close()
    arrays = [p["weight"].to_numpy() for p, _ in loaded.values()]
    assert all(a.shape == (16, 16) and np.isfinite(a).all() for a in arrays)
    assert all(not p["weight"].data.readonly for p, _ in loaded.values())  # writable copies


def test_readers_see_the_old_or_the_new_pointer(st, root):
    token = lease(st, "a", "t1")
    rng = np.random.default_rng(0)
    publish_next(st, "a", token, "t1", 0, root, rng)
    with Store.open(st.path, readonly=True) as ro:
        seen = [ro.published_models()["t1"].id]
        for n in range(1, 4):
            publish_next(st, "a", token, "t1", n, root, rng, parent=f"a:m{n - 1}")
            seen.append(ro.published_models()["t1"].id)
            check_model_integrity(ro, seen[-1])
    assert seen == ["a:m0", "a:m1", "a:m2", "a:m3"]


def test_parent_must_exist(st, root):
    token = lease(st, "a", "t1")
    writes = child_writes("a", 0, np.random.default_rng(0))
    orphan = child_model("a", "t1", 0, writes, root, parent="a:m41")
    with pytest.raises(MissingReference, match="parent"):
        st.commit("a", token, components=writes, models=[orphan])


# ---- events ----------------------------------------------------------------------------------

def test_events_are_ordered_and_contiguous(st, root):
    """260 events (> 256, so the byte order of the keys matters), each from a real commit: the root,
    then the agent re-publishing its model with event kinds and data of its choosing."""
    token = lease(st, "a", "t1")
    publish_next(st, "a", token, "t1", 0, root, np.random.default_rng(0))
    model = st.get_model("a:m0")
    kinds = [f"k{i % 7}" for i in range(258)]
    seqs = [1, 2] + [st.commit("a", token, publish=pub(model), event_kind=kind, event_data={"i": i})
                     for i, kind in enumerate(kinds)]
    assert seqs == list(range(1, 261)) and st.last_event_seq() == 260
    events = st.events()
    assert [e.seq for e in events] == seqs
    assert [e.kind for e in events] == ["root", "published", *kinds]
    assert [e.data.get("i") for e in events[2:]] == list(range(258))
    assert all((e.task, e.agent, e.model_id) == ("t1", "a", "a:m0") for e in events[1:])
    assert [e.seq for e in st.events(after=250, limit=5)] == [251, 252, 253, 254, 255]
    assert st.events(after=260) == []
    assert st.verify() == []


# ---- StoreFull ---------------------------------------------------------------------------------

def test_store_full_aborts_the_commit_and_leaves_the_store_consistent(tmp_path):
    path = tmp_path / "tiny"
    with Store.open(path, create=True, map_size=1 * 2**20) as st:
        root = make_root(st)
        token = lease(st, "a", "t1")
        publish_next(st, "a", token, "t1", 0, root, np.random.default_rng(0))
        before = _counts(st)
        big = ComponentWrite.build("a:100", "head", "a",
                                   {"w": random_tensor(np.random.default_rng(1), 512, 1024)})
        with pytest.raises(StoreFull, match="query.py gc") as info:
            st.commit("a", token, components=[big])
        assert len(str(info.value).splitlines()) == 1
        assert _counts(st) == before and st.verify() == []
        publish_next(st, "a", token, "t1", 1, root, np.random.default_rng(2), parent="a:m0")
    with Store.open(path, readonly=True) as st:
        assert st.published_models()["t1"].id == "a:m1" and st.verify() == []


# ---- verify ------------------------------------------------------------------------------------

def _raw_env(path):
    env = lmdb.open(str(path), max_dbs=16, map_size=2**30)
    return env, {n: env.open_db(n.encode()) for n in ("blobs", "components", "models", "tasks",
                                                         "events", "agent_state")}


def test_verify_detects_a_corrupted_blob(st, root):
    token = lease(st, "a", "t1")
    publish_next(st, "a", token, "t1", 0, root, np.random.default_rng(0))
    key = st.get_component("a:0").tensors["weight"]
    st.close()
    env, dbs = _raw_env(st.path)
    with env.begin(write=True) as txn:
        good = bytes(txn.get(key.encode(), db=dbs["blobs"]))
        flipped = good[:-1] + bytes([good[-1] ^ 0xFF])  # same header, one byte of data changed
        txn.put(key.encode(), flipped, db=dbs["blobs"])
        txn.put(b"f" * 64, b"garbage, not a blob", db=dbs["blobs"])
    env.close()
    with Store.open(st.path, readonly=True) as ro:
        problems = ro.verify()
    assert any(key in p and "corrupted" in p for p in problems)
    assert any("f" * 64 in p and "undecodable" in p for p in problems)
    assert len(problems) == 2


def test_verify_detects_dangling_references_and_gaps(st, root):
    token = lease(st, "a", "t1")
    rng = np.random.default_rng(0)
    publish_next(st, "a", token, "t1", 0, root, rng)
    publish_next(st, "a", token, "t1", 1, root, rng, parent="a:m0")
    blob = st.get_component("a:2").tensors["weight"]
    st.close()
    env, dbs = _raw_env(st.path)
    with env.begin(write=True) as txn:
        txn.delete(b"a:0", db=dbs["components"])       # used by a:m0
        txn.delete(b"a:m1", db=dbs["models"])          # pointer, state and nothing else use it
        txn.delete(blob.encode(), db=dbs["blobs"])     # used by a:2
        txn.put(b"t9", pack_value({"oops": 1}), db=dbs["tasks"])
        txn.delete((2).to_bytes(8, "big"), db=dbs["events"])
    env.close()
    with Store.open(st.path, readonly=True) as ro:
        problems = "\n".join(ro.verify())
    for expected in ("models/a:m0: refers to missing component a:0",
                     "tasks/t1: points to missing model a:m1",
                     "agent_state/a: refers to missing model a:m1",
                     f"components/a:2: tensor 'weight' refers to missing blob {blob}",
                     "TaskRecord", "expected seq 2, found 3"):
        assert expected in problems


# ---- gc ----------------------------------------------------------------------------------------

def test_gc_keeps_everything_referenced_and_removes_the_rest(st, root):
    token = lease(st, "a", "t1")
    rng = np.random.default_rng(0)
    for n in range(3):  # a:m0 <- a:m1 <- a:m2 (published)
        publish_next(st, "a", token, "t1", n, root, rng, parent=f"a:m{n - 1}" if n else None)
    # a rejected child of a:m0 that nothing refers to, with one unique and one shared blob
    writes = child_writes("a", 10, rng)
    rejected = child_model("a", "t1", 10, writes, root, parent="a:m0")
    st.commit("a", token, components=writes, models=[rejected])
    # state keeps only a:m1 in the population; a:m0 survives as its ancestor
    state = st.get_agent_state("a")
    state.population, state.best_model_id = ["a:m1"], "a:m1"
    st.commit("a", token, state=state)
    unique = [k for w in writes for k in [*w.record.tensors.values(), *w.record.momentum.values()]
              if k != blob_key(rt(np.zeros(3))) and k != blob_key(rt(np.zeros(16)))]
    before = _counts(st)

    assert st.gc(grace_seconds=3600)["models"] == 0  # everything is recent: nothing goes
    counts = st.gc(grace_seconds=60, now=time.time() + 3600)
    assert counts["models"] == 1 and counts["components"] == 2
    assert counts["blobs"] == len(unique) and counts["bytes_freed"] > 0
    assert st.get_model(rejected.id) is None and st.get_component(writes[0].record.id) is None
    assert all(st.get_model(f"a:m{n}") for n in range(3)) and st.get_model(root.id)
    after = _counts(st)
    assert after["blobs"] == before["blobs"] - len(unique)
    assert st.verify() == [] and st.events()[-1].kind == "gc"
    for mid in ("a:m0", "a:m1", "a:m2", root.id):
        check_model_integrity(st, mid)
    assert st.gc(grace_seconds=60, now=time.time() + 3600)["models"] == 0

    # an agent that still holds the deleted component in memory gets MissingReference
    stale = ModelRecord(**{**rejected.to_dict(), "id": "a:m11", "parent": "a:m2"})
    with pytest.raises(MissingReference, match="gc"):
        st.commit("a", token, models=[stale])


def test_stats_counts(st, root):
    info = st.stats()
    assert info["counts"]["models"] == 1 and info["counts"]["components"] == len(root.components)
    assert info["map_size"] == DEFAULT_MAP_SIZE or info["map_size"] > 0
    assert 0 < info["used_bytes"] <= info["file_bytes"] and info["last_event_seq"] == 1
    unique = {blob_key(t): t for p, _ in st.load_model_tensors(root.id).values()
              for t in p.values()}  # the zero biases are one blob
    expected = sum(len(encode_blob(t)) for t in unique.values())
    assert info["blob_bytes"] == expected


def test_agent_state_round_trip(st, root):
    token = lease(st, "a", "t1")
    state = AgentState(agent_id="a", task="t1", cycle=3, generation=1, population=[root.id],
                       best_model_id=None, next_component_id=9, next_model_id=4,
                       offsprings={root.id: 2}, updated_at=1.0)
    assert st.commit("a", token, state=state) is None
    assert st.get_agent_state("a") == state


def test_an_agent_state_stored_with_the_retired_extra_field_still_loads(st, root):
    """A store written before ``AgentState.extra`` was removed: the state loads, without it."""
    from store.codec import str_key, unpack_value

    def raw_state() -> dict:
        with st._read() as txn:
            return unpack_value(txn.get(str_key("a"), db=st._dbs.agent_state), "agent_state/a")

    token = lease(st, "a", "t1")
    state = AgentState(agent_id="a", task="t1", cycle=2, generation=1, population=[root.id],
                       best_model_id=None, next_component_id=3, next_model_id=1,
                       offsprings={}, updated_at=1.0)
    st.commit("a", token, state=state)
    with st._write() as txn:  # what an older version left in LMDB: the same state plus ``extra``
        txn.put(str_key("a"), pack_value({**state.to_dict(), "extra": {"rng_state": [1, 2, 3]}}),
                db=st._dbs.agent_state)
    assert "extra" in raw_state()
    assert st.get_agent_state("a") == state
    assert st.verify() == []
    st.commit("a", token, state=state)  # the next commit rewrites it without the field
    assert "extra" not in raw_state() and st.get_agent_state("a") == state


def test_one_environment_per_process_is_shared(tmp_path):
    path = tmp_path / "s"
    with Store.open(path, create=True) as writer:
        with Store.open(path, readonly=True) as reader:
            root = make_root(writer)
            assert reader.last_event_seq() == 1 and reader.root_model_id() == root.id
        # closing the reader left the writer's env open
        token = lease(writer, "a", "t1")
        assert publish_next(writer, "a", token, "t1", 0, root, np.random.default_rng(0)) == 2
    with Store.open(path, readonly=True) as reader:
        with pytest.raises(StoreError, match="already open read-only"):
            Store.open(path)
        assert reader.last_event_seq() == 2


def test_create_refuses_a_non_empty_directory_without_a_store(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(NotAStore, match="not empty"):
        Store.open(tmp_path, create=True)
    assert os.listdir(tmp_path) == ["notes.txt"]

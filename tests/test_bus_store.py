"""Three peers in three processes on loopback see each other's `published` messages; a peer joining
late reads what it missed from the store's event log, not from the socket."""
from __future__ import annotations

import multiprocessing as mp
import time

from helpers.bus_peers import peer_main
from helpers.store_records import make_root
from store import Store


def test_three_peers_and_a_late_joiner(tmp_path):
    path = str(tmp_path / "store")
    with Store.open(path, create=True) as st:
        make_root(st)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    per_peer, early = 6, ["a", "b", "c"]
    total = per_peer * (len(early) + 1)
    procs = [ctx.Process(target=peer_main, args=(path, f"agent~{x}", f"task_{x}", per_peer, total,
                                                 False, results)) for x in early]
    try:
        for p in procs:
            p.start()
        # the late peer starts once the early ones have published something
        deadline = time.time() + 60
        while time.time() < deadline:
            with Store.open(path, readonly=True) as st:
                if len([e for e in st.events() if e.kind == "published"]) >= 6:
                    break
            time.sleep(0.1)
        late = ctx.Process(target=peer_main, args=(path, "agent~late", "task_late", per_peer, total,
                                                   True, results))
        late.start()
        procs.append(late)
        out = {r["agent"]: r for r in (results.get(timeout=90) for _ in procs)}
        for p in procs:
            p.join(30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    with Store.open(path, readonly=True) as st:
        published = {e.seq: e.agent for e in st.events() if e.kind == "published"}
        assert st.verify() == []
    assert len(published) == total
    for agent, r in out.items():
        heard = set(r["socket"]) | set(r["log"]) | set(r["mine"])
        assert heard == set(published), (agent, sorted(set(published) - heard))
    late_r = out["agent~late"]
    before_join = {seq for seq in late_r["log"] if seq < min(late_r["mine"])}
    assert before_join, "the late peer did not read what it missed from the event log"
    assert late_r["socket"], "the late peer heard nothing live over the socket"
    for agent, r in out.items():  # the live path works between every pair of peers
        others = set(out) - {agent}
        assert set(r["senders"]) == others, (agent, r["senders"])

"""Child-process entry point (a multiprocessing ``spawn`` target) for the bus + store test: a peer
that publishes through the store and announces on its PeerBus (what an agent does, without the model
training)."""
from __future__ import annotations

import os
import time

import numpy as np

from helpers.store_records import publish_next
from protocol.bus import PeerBus
from protocol.messages import Hello, Published
from store import Store


def peer_main(path: str, agent: str, task: str, publishes: int, expect_total: int, late: bool,
              results) -> None:
    rng = np.random.default_rng(abs(hash(agent)) % 2**32)
    with Store.open(path) as st, PeerBus(agent) as bus:
        root = st.get_model(st.root_model_id())
        token = st.acquire_lease(agent, task, ttl=60, host="localhost", pid=os.getpid(),
                                 device="cpu", endpoint=bus.endpoint, preset="test")
        seen_socket: set[int] = set()
        seen_log: set[int] = set()
        mine: list[int] = []
        senders: dict[str, int] = {}

        def rescan():
            bus.set_peers({a.agent_id: a.endpoint for a in st.live_agents() if a.agent_id != agent})

        rescan()
        if late:  # catch up from the event log: what was published before we were listening
            seen_log |= {e.seq for e in st.events() if e.kind == "published"}
        bus.send(Hello(agent_id=agent, task=task, endpoint=bus.endpoint, pid=os.getpid(),
                       host="localhost"))
        deadline = time.time() + 60
        n = 0
        last_scan = last_pub = time.time()
        while time.time() < deadline:
            if time.time() - last_scan > 0.2:  # periodic rescan: a lost Hello costs only a moment
                rescan()
                last_scan = time.time()
            if n < publishes and time.time() - last_pub > 0.3:  # paced, so peers overlap in time
                last_pub = time.time()
                seq = publish_next(st, agent, token, task, n, root, rng,
                                   parent=f"{agent}:m{n - 1}" if n else None)
                mine.append(seq)
                bus.send(Published(agent_id=agent, task=task, model_id=f"{agent}:m{n}", seq=seq))
                n += 1
            for msg in bus.poll(100):
                if isinstance(msg, Hello):
                    rescan()
                elif isinstance(msg, Published):
                    seen_socket.add(msg.seq)
                    senders.setdefault(msg.agent_id, 0)
                    senders[msg.agent_id] += 1
            known = seen_socket | seen_log | set(mine)
            # sequence numbers have no gaps: a gap is a message lost on the way; the log has it
            gaps = set(range(1, max(known, default=0) + 1)) - known
            if gaps:
                seen_log |= {e.seq for e in st.events() if e.seq in gaps and e.kind == "published"}
            if n >= publishes and len(seen_socket | seen_log | set(mine)) >= expect_total:
                break
        results.put({"agent": agent, "socket": sorted(seen_socket), "log": sorted(seen_log),
                     "mine": mine, "senders": senders})
        time.sleep(0.5)  # let the others finish hearing us before the socket closes

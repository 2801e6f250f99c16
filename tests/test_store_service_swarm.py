"""A swarm across "hosts" on one machine: the store service on 127.0.0.2, agents that use the LMDB
directory on the service's host, and agents on 127.0.0.3 / 127.0.0.4 that reach the store only
through the service (CURVE keys copied to their own key folders, their own blob caches).

- two local agents (run_swarm.py on the directory) and two remote ones (attach.py --store tcp://...)
  all finish and publish, the second remote one attached while the swarm runs; the service is
  killed with SIGKILL mid-run and restarted, and the remote agents wait, retry and go on;
- leaderboard and export through the service give what the directory gives; verify is clean;
- kill -9 a remote agent: its lease expires, re-attaching resumes it from the store.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time

import numpy as np
import pytest

from helpers.service_procs import ENV, free_port, start_service
from helpers.swarm import make_store, run_cli, wait_for

from agents.agent import agent_id_for
from store import Store
from taskdata import load_task

pytestmark = pytest.mark.slow
SERVICE_HOST = "127.0.0.2"


def digits_copy(path: str) -> str:
    d = load_task("uci_digits")
    np.savez(path, x_train=d.train_x, y_train=d.train_y, x_val=d.val_x, y_val=d.val_y,
             x_test=d.test_x, y_test=d.test_y)
    return f"npz:{path}"


def host_keys(keydir: str, folder) -> str:
    os.makedirs(folder, exist_ok=True)
    for name in ("server.key", "client.key", "client.key_secret"):
        shutil.copy2(os.path.join(keydir, name), os.path.join(folder, name))
    return str(folder)


def launch(script: str, *args: str, log: str, env: dict | None = None):
    import subprocess
    import sys

    from helpers import REPO

    return subprocess.Popen([sys.executable, os.path.join(REPO, "launch", script), *args],
                            cwd=REPO, env=dict(ENV, **(env or {})), stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


def read(path, fn):
    with Store.open(path, readonly=True) as st:
        return fn(st)


def remote_env(tmp, host: str) -> dict:
    return {"MUNET_BLOB_CACHE": str(tmp / f"cache-{host}"), "MUNET_STORE_REPLY_TIMEOUT": "5"}


@pytest.fixture(scope="module")
def multihost(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multihost")
    store, keydir = str(tmp / "store"), str(tmp / "keys")
    make_store(store)
    port = free_port(SERVICE_HOST)
    svc = start_service(store, host=SERVICE_HOST, port=port, keys=keydir)
    remote = f"tcp://{SERVICE_HOST}:{port}"
    fourth = digits_copy(str(tmp / "digits_copy.npz"))
    k3, k4 = host_keys(keydir, tmp / "keys-127.0.0.3"), host_keys(keydir, tmp / "keys-127.0.0.4")
    procs = {}
    try:
        procs["local"] = launch("run_swarm.py", "--store", store, "--tasks", "uci_digits,mnist5k",
                                "--preset", "test", "--cycles", "2", "--threads", "1",
                                log=str(tmp / "local.log"))
        procs["remote3"] = launch("attach.py", "--store", remote, "--keys", k3, "--task",
                                  "glyphs_latin", "--preset", "test", "--cycles", "2",
                                  "--threads", "1", "--bind-host", "127.0.0.3",
                                  log=str(tmp / "remote3.log"), env=remote_env(tmp, "127.0.0.3"))
        wait_for(lambda: read(store, lambda s: s.get_task("glyphs_latin")), 180,
                 "the remote agent's first publish")
        procs["remote4"] = launch("attach.py", "--store", remote, "--keys", k4, "--task", fourth,
                                  "--preset", "test", "--cycles", "2", "--threads", "1",
                                  "--bind-host", "127.0.0.4", log=str(tmp / "remote4.log"),
                                  env=remote_env(tmp, "127.0.0.4"))
        wait_for(lambda: read(store, lambda s: len(s.trials(task=fourth)) >= 1), 180,
                 "the attached remote agent's first child")
        svc.kill()  # SIGKILL the service while remote agents train and commit
        time.sleep(2.0)  # an outage of 2 s (not a wait for something): the agents must ride it out
        svc = start_service(store, host=SERVICE_HOST, port=port, keys=keydir)
        codes = {name: p.wait(400) for name, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    yield {"store": store, "remote": remote, "keys": k3, "svc": svc, "codes": codes, "tmp": tmp,
           "fourth": fourth, "keydir": keydir}
    svc.kill()


def test_local_and_remote_agents_finish_and_publish_through_a_restarted_service(multihost):
    m = multihost
    logs = {n: open(m["tmp"] / f"{n}.log").read()[-3000:] for n in m["codes"]}
    assert m["codes"] == {"local": 0, "remote3": 0, "remote4": 0}, logs
    tasks = read(m["store"], lambda s: {t.task for t in s.tasks()})
    assert tasks == {"uci_digits", "mnist5k", "glyphs_latin", m["fourth"]}
    for host in ("127.0.0.3", "127.0.0.4"):  # each remote host fetched the root into its cache
        cache = m["tmp"] / f"cache-{host}"
        assert sum(len(f) for _, _, f in os.walk(cache)) > 0
    hosts = read(m["store"], lambda s: {a.task: a.endpoint for a in s.agents()})
    assert hosts["glyphs_latin"].startswith("tcp://127.0.0.3:")
    assert hosts[m["fourth"]].startswith("tcp://127.0.0.4:")
    states = read(m["store"], lambda s: {a.task: s.get_agent_state(a.agent_id).cycle
                                         for a in s.agents()})
    assert set(states.values()) == {2}


def test_query_and_export_through_the_service_match_the_directory(multihost, tmp_path):
    m = multihost
    flags = ["--store", m["remote"], "--keys", m["keys"]]
    remote = run_cli("launch/query.py", *flags, "leaderboard", "--json")
    local = run_cli("launch/query.py", "--store", m["store"], "leaderboard", "--json")
    assert remote.returncode == 0 and local.returncode == 0, remote.stderr + local.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    out_r, out_l = str(tmp_path / "r.safetensors"), str(tmp_path / "l.safetensors")
    assert run_cli("launch/query.py", *flags, "export", "glyphs_latin", "--out", out_r,
                   env=remote_env(tmp_path, "x")).returncode == 0
    assert run_cli("launch/query.py", "--store", m["store"], "export", "glyphs_latin", "--out",
                   out_l).returncode == 0
    assert open(out_r, "rb").read() == open(out_l, "rb").read()
    verify = run_cli("launch/query.py", *flags, "verify")
    assert verify.returncode == 0 and verify.stdout.startswith("ok"), verify.stderr
    assert read(m["store"], lambda s: s.verify()) == []


def test_kill9_a_remote_agent_then_reattach_resumes_it(multihost):
    m = multihost
    tmp, remote, task = m["tmp"], m["remote"], "glyphs_greek"
    args = ["--store", remote, "--keys", m["keys"], "--task", task, "--preset", "test",
            "--cycles", "2", "--threads", "1", "--bind-host", "127.0.0.3", "--lease-ttl", "3"]
    first = launch("attach.py", *args, log=str(tmp / "greek1.log"),
                   env=remote_env(tmp, "127.0.0.3"))
    try:
        wait_for(lambda: read(m["store"], lambda s: len(s.trials(task=task)) >= 2), 180,
                 "two children of the remote agent")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        before = read(m["store"], lambda s: [t.id for t in s.trials(task=task)])
        aid = agent_id_for(task)
        wait_for(lambda: not read(m["store"], lambda s: [a for a in s.live_agents() if a.agent_id == aid]),
                 30, "the killed agent's lease to run out")
        second = launch("attach.py", *args, log=str(tmp / "greek2.log"),
                        env=remote_env(tmp, "127.0.0.3"))
        assert second.wait(300) == 0, open(tmp / "greek2.log").read()[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    after = read(m["store"], lambda s: [t.id for t in s.trials(task=task)])
    assert after[:len(before)] == before and len(after) == len(set(after))
    state = read(m["store"], lambda s: s.get_agent_state(f"agent~{task}"))
    assert state.cycle == 2
    # test preset: 2 children's images per cycle (more children when +hurdle stops some early), and
    # no (cycle, generation) trained twice across the kill
    assert len(after) >= 2 * 2
    pairs = read(m["store"], lambda s: [(t.cycle, t.generation) for t in s.trials(task=task)])
    assert len(set(pairs)) == len(pairs) == len(after)
    assert read(m["store"], lambda s: s.verify()) == []

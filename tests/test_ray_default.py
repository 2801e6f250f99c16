"""``--launcher ray`` with no ``--ray-address`` behaves as ``ray.init()`` (slow suite): RAY_ADDRESS
if set, else the cluster this node runs, else a private Ray on this machine, saying which. Runs
after test_cluster.py, whose cluster is gone by then."""
from __future__ import annotations

import pytest
from helpers.swarm import read

pytestmark = pytest.mark.slow
pytest.importorskip("ray")

from agents.agent import agent_id_for  # noqa: E402
from benchmarks.cluster import start_launcher  # noqa: E402


def test_a_laptop_without_a_ray_cluster_gets_a_private_one(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    store, out = str(tmp_path / "store"), str(tmp_path / "launcher.log")
    proc = start_launcher(store, ["uci_digits"], "--launcher", "ray", "--preset", "test", "--cycles", "1",
                          "--root", "random", "--logs", str(tmp_path / "logs"), log_path=out)
    try:
        assert proc.wait(300) == 0, open(out).read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "starting a private one" in open(out).read()
    assert read(store, lambda s: s.get_agent_state(agent_id_for("uci_digits"))).cycle == 1


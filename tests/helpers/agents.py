"""One way for a test to drive an agent in this process, a generation at a time, on a real store."""
from __future__ import annotations

from agents.agent import Agent, AgentOptions
from store import Store


def open_agent(store: Store, task: str, preset: str = "test", seed: int = 0) -> Agent:
    """An agent opened on ``store`` (lease taken, view loaded, population read), ready for
    ``run_generation`` or the single steps; close it with ``agent._close()``."""
    agent = Agent(AgentOptions(store=store.path, task=task, preset=preset, seed=seed, threads=1,
                               lease_ttl=30.0, heartbeat_every=30.0), store=store)
    agent._open()
    agent.view.refresh()
    agent._peers()
    agent.population = [agent.view.path(m) for m in agent.state.population]
    return agent

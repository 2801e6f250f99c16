"""What an agent reports about itself: its progress (sent with every heartbeat) and a kept child's
metrics (stored in its model record). Typed here; plain dicts only at the store boundary."""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

RECENT_LATENCIES = 50  # enough for a median, small enough for every heartbeat


def cycle_position(progress: dict, generation: int | None = None) -> str:
    """Where an agent is inside its cycle, as every view prints it: children over the cycle's count,
    or, when a cycle is an image budget (+hurdle: children stopped early leave images for more),
    the images spent over that budget. ``generation`` overrides the progress's own count (the
    store's resumable state, which ``query.py agents`` reads)."""
    gen = progress.get("generation", 0) if generation is None else generation
    budget = progress.get("cycle_budget")
    if budget:
        return f"{gen} ch, {progress.get('cycle_images', 0) / 1000:.1f}k/{budget / 1000:.1f}k img"
    return f"{gen}/{progress.get('generations', '?')}"


@dataclass
class Progress:
    """The agent's live numbers; ``to_dict`` is what ``query.py agents`` and the live view read."""

    cycles: int
    generations: int
    preset: str
    cycle: int = 0
    generation: int = 0              # children trained in the current cycle
    cycle_images: int = 0            # training images spent in the current cycle
    cycle_budget: int | None = None  # images a cycle may spend (+hurdle); None: a cycle is `generations` children
    children: int = 0
    accepted: int = 0
    best_score: float | None = None
    best_quality: float | None = None
    best_test: float | None = None
    params: float | None = None
    children_per_min: float = 0.0
    last_event: str = ""
    announcements: int = 0           # peers' publishes heard over ZeroMQ
    refresh_latency_ms: float | None = None   # bus: publish sent -> our view refreshed
    refresh_latencies_ms: list[float] = field(default_factory=list)
    log_refreshes: int = 0           # publishes found first in the store's event log
    started: float = field(default_factory=time.time)

    def heard(self, sent_at: float, what: str) -> None:
        """A peer's announcement on the bus was acted on (the view refreshed) now."""
        lat = round((time.time() - sent_at) * 1000.0, 2)
        self.announcements += 1
        self.refresh_latency_ms = lat
        self.refresh_latencies_ms = (self.refresh_latencies_ms + [lat])[-RECENT_LATENCIES:]
        self.last_event = what

    def read_in_log(self, what: str) -> None:
        """A publish found in the event log (no latency: its time is the store host's clock)."""
        self.log_refreshes += 1
        self.last_event = what

    def published(self, metrics: ChildMetrics) -> None:
        self.best_score, self.best_quality = metrics.score, metrics.quality
        self.best_test, self.params = metrics.test_quality, metrics.params

    def next_cycle(self, cycle: int) -> None:
        self.cycle, self.generation, self.cycle_images = cycle, 0, 0

    def to_dict(self) -> dict:
        """A snapshot (the lease thread sends it while the loop keeps updating the object)."""
        mins = max(1e-9, (time.time() - self.started) / 60.0)
        self.children_per_min = round(self.children / mins, 2)
        d = dataclasses.asdict(self)
        del d["started"]
        if self.refresh_latency_ms is None:
            del d["refresh_latency_ms"]
        return d


@dataclass(frozen=True)
class ChildMetrics:
    """A kept child's record: validation quality and score, its size/compute terms, and where it
    stands in its lineage's training (``lineage_steps`` feeds ``+continue``)."""

    quality: float
    score: float
    params: float
    accounted_params: float
    flops: float
    num_cycles: int
    steps: int
    lineage_steps: int
    test_quality: float | None = None  # only for a child that becomes the agent's best

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if d["test_quality"] is None:
            del d["test_quality"]
        return d

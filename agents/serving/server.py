"""A live model server's engine: the current plan, a thread that follows the store, a micro-batcher.

``ModelServer`` opens the store read-only in its own thread (a store handle is used from one thread),
builds the first plan, and then follows the store: it listens on the agents' bus for ``published``
announcements (a hint that arrives at once) and re-reads the serving pointers every ``poll_s`` seconds
anyway (the truth: announcements can be lost). When a served task's pointer moved, it loads the new
model beside the old ones, builds a new ``Plan`` and swaps it in with one assignment; batches read
``server.plan`` once, so a batch that started on the old plan finishes on it and every answer names
the model that computed it. Nothing here writes to the store.

``MicroBatcher`` gathers concurrent requests into one batch (up to ``max_batch`` images, waiting at
most ``max_wait_s`` after the first) and runs it on one worker thread; its queue holds at most
``max_queue`` requests, and ``submit`` refuses more at once (the HTTP layer answers 503).
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from agents.serving.loader import ModelLoader
from agents.serving.plan import Plan, ServedModel
from protocol.bus import PeerBus
from protocol.messages import Published
from store import open_store

log = logging.getLogger("munet.serve")
PEER_REFRESH_S = 2.0  # how often the live agents (the bus's peers) are re-read from the store


class NotServed(KeyError):
    """A request named a task this server does not serve (HTTP 404)."""


class QueueFull(RuntimeError):
    """The request queue is full (HTTP 503 with Retry-After)."""


class ModelServer:
    def __init__(self, store: str, *, keys: str | None = None, device: str = "cpu",
                 tasks: Sequence[str] | None = None, poll_s: float = 2.0, use_bus: bool = True) -> None:
        self.store_spec, self.keys = store, keys
        self.device = torch.device(device)
        self.only = set(tasks) if tasks else None
        self.poll_s, self.use_bus = poll_s, use_bus
        self.plan = Plan({}, version=0)
        self.swaps = 0
        self.checks = 0
        self.last_check = 0.0
        self.on_swap: list[Callable[[Plan, Plan], None]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._wake = threading.Event()
        self._error: BaseException | None = None
        self._bus_failed = False
        self.load_failures: dict[str, str] = {}  # task -> why its newest model could not be loaded
        self._thread = threading.Thread(target=self._follow, name="munet-serve-follow", daemon=True)

    # ---- lifecycle --------------------------------------------------------------------------------
    def start(self, timeout: float = 300.0) -> "ModelServer":
        """Open the store and build the first plan (raises what went wrong: a missing store, ...)."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError(f"the first plan was not built within {timeout:.0f} s")
        if self._error is not None:
            raise self._error
        return self

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def check_now(self) -> None:
        """Re-read the pointers at once instead of at the next poll (tests, operators)."""
        self._wake.set()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._error is None and self._thread.is_alive()

    # ---- following the store ------------------------------------------------------------------------
    def _follow(self) -> None:
        bus = None
        try:
            with open_store(self.store_spec, readonly=True, keys=self.keys) as store:
                loader = ModelLoader(store, self.device)
                self._refresh(store, loader)
                self._ready.set()
                if self.use_bus:
                    try:
                        bus = PeerBus(f"serve-{os.getpid()}-{id(self):x}", host="127.0.0.1")
                    except Exception as exc:  # the bus is a hint: polling alone still follows the store
                        log.warning("serve: no bus (%s); following the store by polling only", exc)
                while not self._stop.is_set():
                    if self._bus_failed:
                        bus, self._bus_failed = None, False
                    self._wait_for_news(store, bus)
                    if self._stop.is_set():
                        break
                    try:
                        self._refresh(store, loader)
                    except Exception as exc:  # keep serving the current plan; try again next time
                        log.warning("serve: re-reading the store failed (%s: %s); still serving "
                                    "plan %d", type(exc).__name__, exc, self.plan.version)
        except BaseException as exc:  # noqa: BLE001 (reported to start(), which raises it)
            if not self._ready.is_set():
                self._error = exc
                self._ready.set()
            else:
                log.error("serve: the store follower stopped: %s: %s", type(exc).__name__, exc)
        finally:
            if bus is not None:
                bus.close()

    def _wait_for_news(self, store, bus: PeerBus | None) -> None:
        """Return at the next poll, or at once on a publication announced for a served task. The
        bus's peers (the live agents) are re-read every ``PEER_REFRESH_S``, so an agent that
        attaches is heard within seconds, whatever the poll interval."""
        now = time.monotonic()
        deadline, peers_due = now + self.poll_s, now
        while not self._stop.is_set() and not self._wake.is_set():
            now = time.monotonic()
            if now >= deadline:
                break
            if bus is None:
                self._wake.wait(min(deadline - now, 0.25))
                continue
            if now >= peers_due:
                peers_due = now + PEER_REFRESH_S
                try:
                    bus.set_peers({a.agent_id: a.endpoint for a in store.live_agents() if a.endpoint})
                except Exception as exc:  # the bus is a hint; polling still finds every change
                    log.debug("serve: bus peers not updated: %s", exc)
            wait_ms = int(min(deadline - now, 0.25) * 1000)
            try:
                news = bus.poll(wait_ms)
            except Exception as exc:  # a broken bus must not end the following: poll the store instead
                log.warning("serve: the bus failed (%s); following the store by polling only", exc)
                bus.close()
                self._bus_failed = True
                return
            if any(isinstance(m, Published) and self._serves(m.task) for m in news):
                break
        self._wake.clear()

    def _serves(self, task: str) -> bool:
        return self.only is None or task in self.only

    def _refresh(self, store, loader: ModelLoader) -> None:
        self.checks += 1
        self.last_check = time.time()
        pointers = {p.task: p for p in store.tasks() if self._serves(p.task)}
        current = self.plan.models
        models: dict[str, ServedModel] = {}
        for task, pointer in pointers.items():
            old = current.get(task)
            if old is not None and old.info.model_id == pointer.model_id:
                models[task] = old
                continue
            try:  # one model that cannot be loaded must not hold up every other task's swap
                models[task] = loader.load(pointer)
                self.load_failures.pop(task, None)
            except Exception as exc:
                if self.load_failures.get(task) != pointer.model_id:
                    log.warning("serve: cannot load %s's model %s (%s: %s); %s", task, pointer.model_id,
                                type(exc).__name__, exc, "keeping the one it serves" if old else "not serving it")
                self.load_failures[task] = pointer.model_id
                if old is not None:
                    models[task] = old
        if all(t in current and current[t] is m for t, m in models.items()) and len(models) == len(current):
            return
        old_plan, new_plan = self.plan, Plan(models, version=self.plan.version + 1)
        self.plan = new_plan  # the swap: one assignment, read once per batch
        if old_plan.models:
            self.swaps += sum(1 for t in models if t in old_plan.models
                              and old_plan.models[t].info.model_id != models[t].info.model_id)
            changed = sorted(t for t in models if t not in old_plan.models
                             or old_plan.models[t] is not models[t])
            log.info("serve: plan %d: %s", new_plan.version,
                     ", ".join(f"{t} -> {models[t].info.model_id}" for t in changed))
        loader.release_unused(m.info.model_id for m in models.values())
        for hook in self.on_swap:
            hook(old_plan, new_plan)


@dataclass(eq=False)
class _Work:
    images: list[np.ndarray]
    tasks: tuple[str, ...]
    future: Future = field(default_factory=Future)
    queued_at: float = field(default_factory=time.monotonic)


@dataclass
class Answer:
    """One task's answer to one request: the model that computed it, its class probabilities, and
    that model's class names (never another plan's: a swap may land before the answer is sent)."""

    model_id: str
    probs: np.ndarray  # (images, classes)
    labels: tuple[str, ...] | None = None


def _settle(future: Future, value=None, error: BaseException | None = None) -> None:
    """Answer a request's future unless it was already answered or cancelled."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except Exception:  # InvalidStateError: cancelled (its client went away) or settled already
        pass


class MicroBatcher:
    def __init__(self, server: ModelServer, *, max_batch: int = 64, max_wait_s: float = 0.005,
                 max_queue: int = 256,
                 observe: Callable[[int, int, float], None] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and max_wait_s >= 0")
        self.server = server
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.queue: queue.Queue[_Work] = queue.Queue(maxsize=max_queue)
        self.observe = observe
        self._carry: _Work | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="munet-serve-batch", daemon=True)
        self._thread.start()

    def submit(self, images: list[np.ndarray], tasks: Sequence[str]) -> Future:
        """Queue a request; its future gets {task: Answer}. NotServed / QueueFull at once."""
        served = self.server.plan.models
        missing = [t for t in tasks if t not in served]
        if missing:
            raise NotServed(missing[0])
        work = _Work(list(images), tuple(dict.fromkeys(tasks)))
        try:
            self.queue.put_nowait(work)
        except queue.Full:
            raise QueueFull(f"{self.queue.maxsize} requests are waiting") from None
        return work.future

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        waiting = [self._carry] if self._carry is not None else []
        while True:
            try:
                waiting.append(self.queue.get_nowait())
            except queue.Empty:
                break
        for work in waiting:  # nobody will run them: answer instead of leaving them hanging
            _settle(work.future, error=QueueFull("the server is stopping"))

    def _next_batch(self) -> list[_Work]:
        first = self._carry
        self._carry = None
        while first is None:
            try:
                first = self.queue.get(timeout=0.1)
            except queue.Empty:
                if self._stop.is_set():
                    return []
        batch, images = [first], len(first.images)
        deadline = time.monotonic() + self.max_wait_s
        while images < self.max_batch:
            left = deadline - time.monotonic()
            try:
                work = self.queue.get_nowait() if left <= 0 else self.queue.get(timeout=left)
            except queue.Empty:
                break
            if images + len(work.images) > self.max_batch:
                self._carry = work  # it starts the next batch
                break
            batch.append(work)
            images += len(work.images)
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._next_batch()
            # a request whose client went away (its future cancelled) is not run at all
            batch = [w for w in batch if w.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            started = time.perf_counter()
            try:
                results = self._run(batch)
            except Exception as exc:  # a broken batch fails its requests, never the server
                log.exception("serve: a batch of %d requests failed", len(batch))
                results = [exc] * len(batch)
            for work, result in zip(batch, results):
                _settle(work.future, error=result if isinstance(result, BaseException) else None,
                        value=None if isinstance(result, BaseException) else result)
            if self.observe is not None:
                try:
                    self.observe(sum(len(w.images) for w in batch), len(batch),
                                 time.perf_counter() - started)
                except Exception:  # metrics must never stop the batcher
                    log.exception("serve: recording a batch's metrics failed")

    def _run(self, batch: list[_Work]) -> list[dict[str, Answer] | BaseException]:
        plan = self.server.plan  # read once: this batch runs on one plan, whatever swaps meanwhile
        out: list[dict[str, Answer] | BaseException] = [
            NotServed(next(t for t in w.tasks if t not in plan.models))
            if any(t not in plan.models for t in w.tasks) else {} for w in batch]
        runnable = [w for w, o in zip(batch, out) if not isinstance(o, BaseException)]
        answers = iter(self._answer(plan, runnable) if runnable else [])
        return [o if isinstance(o, BaseException) else next(answers) for o in out]

    def _answer(self, plan: Plan, batch: list[_Work]) -> list[dict[str, Answer]]:
        images: list[np.ndarray] = []
        rows: dict[str, list[int]] = {}
        spans = []
        for work in batch:
            start = len(images)
            images.extend(work.images)
            spans.append((start, len(images)))
            for task in work.tasks:
                rows.setdefault(task, []).extend(range(start, len(images)))
        logits = plan.run(images, {t: np.asarray(r) for t, r in rows.items()}, self.server.device)
        probs = {t: torch.softmax(v, -1).numpy() for t, v in logits.items()}
        index = {t: np.asarray(r) for t, r in rows.items()}
        out = []
        for work, (start, stop) in zip(batch, spans):
            answer = {}
            for task in work.tasks:
                at = int(np.searchsorted(index[task], start))
                info = plan.models[task].info
                answer[task] = Answer(info.model_id, probs[task][at:at + stop - start], info.labels)
            out.append(answer)
        return out

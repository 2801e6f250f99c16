"""One agent: a process that grows the system for one task (docs/method.md sections 3 and 4).

    lease -> announce -> for each cycle: refresh view -> generations -> publish the best -> release
    one generation (agents/generation.py): propose -> train -> judge -> commit

Everything it needs to resume after kill -9 is committed with each generation in one store
transaction (new components, the kept child, the trial, the cycle/generation counters), so a restart
continues the same cycle at the next generation. ZeroMQ messages are only hints to refresh sooner.
The store is any ``StoreAPI``: a local directory or a store service (``tcp://HOST:PORT``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import socket
import threading
import time
import zlib
from dataclasses import dataclass

import torch

from agents import generation as step
from agents.methods import method as agent_method
from agents.bootstrap import ensure_root
from agents.config import DEFAULT_PREFIX_CACHE_MB, Preset, resolve_preset
from agents.paths import ModelPath
from agents.placement import resolve_bind_host, resolve_device
from agents.progress import Progress, cycle_position
from agents.selection import best_path
from agents.training import TaskTensors
from agents.view import SystemView, component_write, model_record, publication
from agents.vit import VitConfig, preset_vit
from protocol.bus import PeerBus
from protocol.messages import Bye, Hello, Published
from store import (AgentState, LeaseHeld, LeaseLost, MissingReference, StoreAPI, StoreError,
                   StoreUnavailable, open_store)
from store.holders import holder_gone
from taskdata import TaskDataError, check_same_task, check_source, load_task, parse_task_spec


def agent_id_for(task: str, kind: str = "single") -> str:
    """Stable id per (task, kind) (a restarted agent continues its own components): safe for
    '<id>:<n>'. The single-path agent of a task is ``agent~<task>``, its multipath agent
    ``multipath~<task>``."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "~" for ch in task)
    return f"{agent_method(kind).id_prefix}~{safe}"


class NoSinglePathModel(RuntimeError):
    """A multipath agent was started for a task whose single-path agent has published nothing yet."""


def generation_rng(seed: int, agent_id: str, cycle: int, generation: int
                   ) -> tuple[random.Random, torch.Generator]:
    """Per-generation seeds: a resumed agent replays the same choices for the same generation."""
    s = zlib.crc32(f"{seed}/{agent_id}/{cycle}/{generation}".encode())
    return random.Random(s), torch.Generator().manual_seed(s)


@dataclass
class AgentOptions:
    store: str
    task: str
    preset: str = "demo"
    device: str = "cpu"              # cpu, cuda, cuda:N, or auto (the GPU an engine left visible, else cpu)
    cycles: int | None = None        # override the preset's cycle budget
    seed: int = 0
    threads: int | None = None       # torch intra-op threads (the launcher divides the cores)
    # --root spec for a store that has no root yet; None = the preset's budget default, which is what
    # run_swarm.py resolves too, so every agent of a preset records the same preset hash
    root: str | None = None
    lease_ttl: float = 15.0
    heartbeat_every: float = 2.0
    bind_host: str = "127.0.0.1"     # or auto: the local address that routes to the store's host
    data_dir: str | None = None
    keys: str | None = None          # CURVE key folder, for a store service beyond loopback
    cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # frozen-prefix activation cache cap; 0 turns the cache off
    kind: str = "single"             # agent kind (agents/methods.py): single or multipath
    wait_for_model: bool = False     # multipath: wait for the task's single-path model instead of failing
    # seconds to wait for a previous holder's lease to run out (a restarted agent whose old process
    # died without releasing it); 0 refuses at once. A holder that keeps heartbeating is still refused.
    wait_lease: float = 0.0


LOG_POLL_SECONDS = 0.5  # how often a training agent looks at the store's event log
POINTER_EVENTS = ("published", "cycle_end")  # events that move a task's published model


class Agent:
    def __init__(self, opts: AgentOptions, store: StoreAPI | None = None):
        """``store``: an already open store to use (in-process tests); else ``opts.store`` is opened."""
        self.opts = opts
        self.preset: Preset = resolve_preset(opts.preset, root=opts.root)
        self.vit: VitConfig = preset_vit(self.preset)
        self.method = agent_method(opts.kind)
        # the task's name is its identity (store, views); the spec may say where its data is now
        self.task, self.source = parse_task_spec(opts.task)
        self.agent_id = agent_id_for(self.task, opts.kind)
        self.device = torch.device(resolve_device(opts.device))
        self.cycles = opts.cycles if opts.cycles is not None else self.preset.budget.cycles
        self.stop_requested = False
        self.stop_signal: int | None = None  # the signal that asked it to stop, if one did
        self.lease_lost = False
        self._store_down = False  # the store service gave up on: nothing more goes through it
        self.progress = Progress(cycles=self.cycles, preset=self.preset.name,
                                 generations=self.preset.budget.children_per_cycle)
        self.verbose = False
        self.population: list[ModelPath] = []
        self._seen_seq = 0  # the view reflects the store's event log up to here
        self._next_log_poll = 0.0
        self._given_store = store

    # ---- set-up ------------------------------------------------------------------------------
    def _open(self) -> None:
        o = self.opts
        if o.threads:
            torch.set_num_threads(o.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        data = load_task(o.task, o.data_dir)
        self.class_names = list(data.class_names) if data.class_names else None  # recorded on publish
        tensors = TaskTensors(data, self.device, 1 << 30 if self.method.full_validation
                              else self.preset.validation_examples,
                              decision_examples=self.preset.decision_examples)
        self.store = self._given_store or open_store(o.store, create=True, keys=o.keys)
        source = {"spec": self.source, "fingerprint": data.fingerprint()}
        try:  # other data under this task's name: refused before anything is taken or written
            prior = self.store.get_agent_state(self.agent_id)
            check_same_task(prior.task if prior else None, o.task, self.agent_id)
            check_source(prior.source if prior else None, o.task, source["fingerprint"])
        except TaskDataError:
            if self._given_store is None:
                self.store.close()
            raise
        ensure_root(self.store, self.preset, self.vit, seed=o.seed)
        if self.method.needs_single_path:
            try:
                self._wait_for_single_path()
            except NoSinglePathModel:
                if self._given_store is None:
                    self.store.close()
                raise
        self.bus = PeerBus(self.agent_id, host=resolve_bind_host(o.bind_host, o.store))
        try:
            self.token = self._acquire_lease()
        except BaseException:
            self.bus.close()
            if self._given_store is None:
                self.store.close()
            raise
        self.view = SystemView(self.store, self.agent_id, self.device)
        self.ctx = step.Context(self.agent_id, self.task, self.preset, self.vit, self.cycles, tensors,
                                self.view, self.method.scorer(self.preset, self.vit), probe_cache={},
                                prefix_cache=self.method.cache(o.cache_mb))
        self.state = self.store.get_agent_state(self.agent_id) or AgentState(
            agent_id=self.agent_id, task=self.task, cycle=0, generation=0, population=[],
            best_model_id=None, next_component_id=0, next_model_id=0, offsprings={},
            updated_at=time.time())
        self.state = dataclasses.replace(self.state, source=source)  # committed with the next generation
        self.progress.cycle_budget = self._cycle_budget()
        self.progress.cycle, self.progress.generation = self.state.cycle, self.state.generation
        self.progress.cycle_images = self.state.cycle_images
        self.store.heartbeat(self.agent_id, self.token, ttl=o.lease_ttl, state="running",
                             progress=self.progress.to_dict())
        self._peers()
        self.bus.send(Hello(agent_id=self.agent_id, task=self.task, endpoint=self.bus.endpoint,
                            pid=os.getpid(), host=socket.gethostname()))
        self._hb_stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._hb.start()

    @property
    def outcome(self) -> str:
        """How ``run`` ended: finished (its cycles are done), superseded (another process took
        its lease), terminated (SIGTERM before the end: a supervisor may restart it) or stopped."""
        if self.lease_lost:
            return "superseded"
        if getattr(self, "state", None) is not None and self.state.cycle >= self.cycles:
            return "finished"
        return "terminated" if self.stop_signal == signal.SIGTERM else "stopped"

    def _wait_for_single_path(self) -> None:
        """A multipath agent builds on its task's single-path model: fail at once, or wait for it."""
        while self.task not in self.store.published_models(kind="single"):
            if not self.opts.wait_for_model:
                raise NoSinglePathModel(
                    f"task {self.task!r} has no single-path model yet: start its single-path agent "
                    f"first (attach.py --task {self.task}) and let it publish")
            if self.stop_requested:
                raise NoSinglePathModel(f"stopped while waiting for {self.task!r}'s single-path model")
            time.sleep(1.0)

    def _acquire_lease(self) -> str:
        """The task's lease; with ``wait_lease``, a previous holder that stopped heartbeating (a
        process an engine is restarting) is waited out instead of refused. The wait is bounded: a
        holder still heartbeating after it is a live duplicate, refused (LeaseHeld, exit 2)."""
        o = self.opts
        give_up = time.monotonic() + o.wait_lease
        while True:
            try:
                return self.store.acquire_lease(
                    self.agent_id, self.task, ttl=o.lease_ttl, host=socket.gethostname(),
                    pid=os.getpid(), device=str(self.device), endpoint=self.bus.endpoint,
                    preset=self.preset.name, kind=self.method.kind)
            except LeaseHeld as exc:
                if self._release_dead_holder():
                    continue  # its process is gone: take the lease over now, not after its TTL
                left = give_up - time.monotonic()
                if left <= 0 or self.stop_requested:
                    raise
                if self.verbose:
                    print(f"[{self.task}] waiting up to {exc.expires_in:.1f} s for the previous "
                          f"holder's lease ({exc.holder}) to run out", flush=True)
                time.sleep(max(0.2, min(exc.expires_in + 0.2, left)))

    def _release_dead_holder(self) -> bool:
        """End the lease of a holder of this task (and kind) that ran on this host and no longer
        runs (a kill -9 leaves its lease live for its TTL); True if one was ended."""
        for a in self.store.live_agents():
            if (a.task, a.kind) == (self.task, self.method.kind) and a.lease_token \
                    and holder_gone(a.host, a.pid, a.heartbeat_at, a.endpoint):
                try:
                    self.store.release_lease(a.agent_id, a.lease_token, state="crashed")
                except LeaseLost:  # someone else ended or took it meanwhile: just try again
                    pass
                if self.verbose:
                    print(f"[{self.task}] the previous holder of its lease (pid {a.pid} on this host) "
                          f"is gone: taking the lease over", flush=True)
                return True
        return False

    def _peers(self) -> None:
        self.bus.set_peers({a.agent_id: a.endpoint for a in self.store.live_agents()
                            if a.agent_id != self.agent_id and a.endpoint})

    def _heartbeat_loop(self) -> None:
        """Keeps the lease fresh even while a long child trains (main thread owns the bus)."""
        while not self._hb_stop.wait(self.opts.heartbeat_every):
            try:
                self.store.heartbeat(self.agent_id, self.token, ttl=self.opts.lease_ttl,
                                     progress=self.progress.to_dict())
            except LeaseLost as exc:
                print(f"[{self.task}] stopping: {exc}", flush=True)
                self.lease_lost = self.stop_requested = True
                return
            except Exception:  # a transient store error must not kill the lease thread
                continue

    def _listen(self) -> bool:
        """Between training steps: refresh the view when a peer published; True abandons the child.

        Two ears: the peers' announcements on the bus (fast, but only from peers this host can
        reach) and, every LOG_POLL_SECONDS, the store's event log (a store service rings its
        doorbell, so this costs nothing while nothing happens). Only the view (a cache of the
        store) changes here; the judge step re-scores the population, so nothing the generation
        holds moves under it."""
        heard, in_log = None, None
        for msg in self.bus.poll(0):
            if isinstance(msg, Published) and msg.agent_id != self.agent_id \
                    and msg.seq > self._seen_seq:
                heard = msg
            elif isinstance(msg, Hello):
                self._peers()
        now = time.monotonic()
        if heard is None and now >= self._next_log_poll:
            self._next_log_poll = now + LOG_POLL_SECONDS
            for ev in self.store.poll_events(self._seen_seq):
                self._seen_seq = max(self._seen_seq, ev.seq)
                if ev.kind in POINTER_EVENTS and ev.agent != self.agent_id:
                    in_log = ev
        if heard is not None:
            self._refresh_view()
            self.progress.heard(heard.time, f"saw {heard.task} publish #{heard.seq}")
        elif in_log is not None:
            self._refresh_view()
            self.progress.read_in_log(f"saw {in_log.task} publish #{in_log.seq} in the log")
        return self.stop_requested

    def _refresh_view(self) -> None:
        """Everything up to the log's current end is in the view after this."""
        self._seen_seq = max(self._seen_seq, self.store.last_event_seq())
        self.view.refresh()

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._open()
        except NoSinglePathModel:
            if self.stop_requested:  # stopped while a multipath agent waited for its task's model
                print(f"[{self.task}] stopped before the task's single-path model existed", flush=True)
                return
            raise
        try:
            while self.state.cycle < self.cycles and not self.stop_requested:
                self._run_cycle()
        except LeaseLost as exc:
            # Another agent took this task over (our heartbeats were late): it owns the task now,
            # and nothing of ours was written after the takeover (the store refused it).
            self.lease_lost = True
            print(f"[{self.task}] stopping: {exc}", flush=True)
        except StoreUnavailable:
            self._store_down = True  # nothing to release through a service that is gone: the lease expires
            raise
        finally:
            self._close()

    def _close(self) -> None:
        self._hb_stop.set()
        self._hb.join(timeout=5)
        state = "finished" if self.state.cycle >= self.cycles else "stopped"
        if not (self.lease_lost or self._store_down):
            try:
                self.store.heartbeat(self.agent_id, self.token, ttl=self.opts.lease_ttl,
                                     state=state, progress=self.progress.to_dict())
                self.store.release_lease(self.agent_id, self.token, state=state)
            except LeaseLost:
                pass
            except StoreError as exc:  # e.g. the store service is gone: the lease just expires
                print(f"[{self.task}] could not release the lease: {exc}", flush=True)
        self.bus.send(Bye(agent_id=self.agent_id, task=self.task, reason=state))
        time.sleep(0.05)  # let the bye leave before LINGER cuts it
        self.bus.close()
        if self._given_store is None:
            self.store.close()

    def _run_cycle(self) -> None:
        self._refresh_view()
        self._peers()
        self.population = [self.view.path(m) for m in self.state.population]
        self._rescore()
        if self.verbose:
            print(f"[{self.task}] cycle {self.state.cycle + 1}/{self.cycles} from generation "
                  f"{self.state.generation + 1} with preset {self.preset.name}; population: "
                  f"{', '.join(p.id for p in self.population) or 'empty (parents come from the system)'}",
                  flush=True)
        self.progress.cycle = self.state.cycle
        self.progress.generation, self.progress.cycle_images = self.state.generation, self.state.cycle_images
        while not self._cycle_done():
            if self.stop_requested:
                return
            self.run_generation()
            self.view.prune(self.population)
        self._rescore()
        best = best_path(self.population)
        self.state = dataclasses.replace(
            self.state, cycle=self.state.cycle + 1, generation=0, cycle_images=0,
            population=[best.id] if best else [], best_model_id=best.id if best else None)
        self._commit(step.Writes([], [], [], best), event_kind="cycle_end",
                     event_data={"cycle": self.state.cycle})
        self.progress.next_cycle(self.state.cycle)
        self.progress.last_event = f"cycle {self.state.cycle} done"

    def _cycle_budget(self) -> int | None:
        """Training images a cycle may spend (+hurdle), or None when a cycle is a count of children."""
        if not (self.preset.hurdle and self.method.cycle_by_images):
            return None
        return self.preset.budget.children_per_cycle * self.preset.child_images(self.ctx.tensors.n_train)

    def _cycle_done(self) -> bool:
        """A cycle is a number of children; with +hurdle, a budget of training images (children
        stopped early leave images for more children), capped at 4x the children as a guard."""
        b, s, budget = self.preset.budget, self.state, self._cycle_budget()
        if budget is None:
            return s.generation >= b.children_per_cycle
        return s.cycle_images >= budget or s.generation >= 4 * b.children_per_cycle

    def _rescore(self) -> None:
        """Rank own paths by their score *now*: other agents' publishes change the accounted params,
        and a path recorded under another preset (say, before +penalty) is judged by this one's."""
        for p in self.population:
            p.current_score = self.ctx.scorer.rescore(p, self.view.lockers)

    def run_generation(self) -> step.Verdict | None:
        """One child, start to end: propose, train, judge, commit. None if it was abandoned."""
        s = self.state
        counters = step.Counters(s.cycle, s.generation, s.next_model_id, s.next_component_id,
                                 dict(s.offsprings), s.cycle_images)
        rng, gen = generation_rng(self.opts.seed, self.agent_id, s.cycle, s.generation)
        proposal = self.method.propose(self.ctx, counters, self.population, rng, gen)
        outcome = self.method.train(self.ctx, proposal, gen, should_stop=self._listen)
        if outcome.result.aborted:
            return None  # nothing of an abandoned child is written; the generation reruns on resume
        verdict = self.method.judge(self.ctx, proposal, outcome, self.population)
        try:
            self._apply(verdict)
        except MissingReference as exc:
            # `gc` removed something this child shares (an old model another agent replaced):
            # drop the child, forget cached paths, keep the trial and the counters.
            print(f"[{self.task}] child {proposal.child.id} dropped: {exc}", flush=True)
            verdict = step.dropped(verdict)
            self.view.prune(verdict.population, forget_cached=True)
            self._apply(verdict)
        self.progress.children += 1
        self.progress.accepted += int(verdict.accepted)
        self.progress.generation = self.state.generation
        self.progress.cycle_images = self.state.cycle_images
        if verdict.published is not None:
            self.progress.published(verdict.metrics)
        if self.verbose:
            self._print_generation(proposal, verdict)
        return verdict

    def _apply(self, v: step.Verdict) -> None:
        """The verdict's counters and population become the agent's state, committed at once."""
        c, best = v.counters, best_path(v.population)
        state = dataclasses.replace(
            self.state, generation=c.generation, cycle_images=c.cycle_images,
            next_model_id=c.next_model_id,
            next_component_id=c.next_component_id, offsprings=dict(c.offsprings),
            population=[p.id for p in v.population], best_model_id=best.id if best else None)
        self._commit(v.writes, state=state)
        self.population = v.population

    def _print_generation(self, p: step.Proposal, v: step.Verdict) -> None:
        verdict = "PUBLISHED" if v.published else ("kept" if v.kept else "dropped")
        q = "-" if v.quality is None else f"{v.quality:.4f}"
        print(f"[{self.task}] cycle {self.state.cycle + 1}/{self.cycles} "
              f"gen {cycle_position(self.progress.to_dict())}: {p.child.id} "
              f"from {p.parent.id} q={q} {verdict} {v.seconds:.1f}s "
              f"{' '.join(p.child.mutations) or '-'}", flush=True)

    def _commit(self, w: step.Writes, *, state: AgentState | None = None,
                event_kind: str = "published", event_data: dict | None = None) -> None:
        """One store transaction; the announcement goes out only after it committed."""
        state = dataclasses.replace(state or self.state, updated_at=time.time())
        if w.publish is not None and self.class_names:  # what serve-models names classes by (metrics
            w.publish.metrics.setdefault("class_names", json.dumps(self.class_names))  # hold scalars)
        seq = self.store.commit(
            self.agent_id, self.token, components=[component_write(c) for c in w.components],
            models=[model_record(m) for m in w.models], state=state,
            publish=publication(w.publish) if w.publish else None, trials=list(w.trials),
            event_kind=event_kind, event_data=event_data)
        self.state = state
        if seq is not None and seq == self._seen_seq + 1:
            self._seen_seq = seq  # our own event, right after everything we had seen: no news
        for m in w.models:
            self.view.remember(m)
        if w.publish and seq is not None:
            m = w.publish.metrics
            self.bus.send(Published(agent_id=self.agent_id, task=self.task,
                                    model_id=w.publish.id, seq=seq, score=m.get("score"),
                                    quality=m.get("quality")))
            self.progress.last_event = f"{event_kind} #{seq}"


def run_agent(opts: AgentOptions, verbose: bool = True, store: StoreAPI | None = None,
              handle_signals: bool = True) -> Agent:
    """Run one agent in this process until its cycles are done; SIGINT/SIGTERM finish cleanly.

    ``handle_signals=False`` leaves signals to whoever owns them (an engine that requeues a
    preempted job on SIGTERM/SIGUSR2, like submitit): stop the agent with ``stop_requested``."""
    agent = Agent(opts, store=store)
    agent.verbose = verbose

    def _stop(signum, frame):
        agent.stop_requested = True
        agent.stop_signal = signum

    if handle_signals and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _stop)
        signal.signal(signal.SIGTERM, _stop)
    agent.run()
    return agent

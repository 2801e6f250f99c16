"""One agent: a process that grows the system for one task (method.md sections 3 and 4).

    lease -> announce -> for each cycle: refresh view -> generations (sample ds hparams, pick a
    parent, build + train + score a child, commit) -> keep the best, publish -> ... -> release

Everything it needs to resume after kill -9 is committed with each generation in one store
transaction (new components, the kept child, the trial, the cycle/generation counters), so a restart
continues the same cycle at the next generation. ZeroMQ messages are only hints to refresh sooner.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
import signal
import socket
import threading
import time
import zlib
from dataclasses import dataclass

import torch

from agents.config import Preset, PresetError, resolve_preset
from taskdata import TaskDataError, load_task
from agents.mutation import Mutator, hparams_diff
from agents.paths import Path
from agents.probe import probe_pick
from agents.bootstrap import RootMismatch, ensure_root
from agents.roots import CheckpointError
from agents.scoring import Scorer
from agents.selection import best_path, retain, select_parent
from agents.training import TaskTensors, test_accuracy, train_child
from agents.view import SystemView, component_write, model_record
from agents.vit import VitConfig, preset_vit
from protocol.bus import PeerBus
from protocol.messages import Bye, Hello, Published
from store import (AgentState, LeaseHeld, LeaseLost, MissingReference, NotAStore, Store,
                   TrialRecord)


def agent_id_for(task: str) -> str:
    """Stable id per task (a restarted agent continues its own components): safe for '<id>:<n>'."""
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "~" for ch in task)
    return f"agent~{safe}"


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
    device: str = "cpu"
    cycles: int | None = None        # override the preset's cycle budget
    seed: int = 0
    threads: int | None = None       # torch intra-op threads (the launcher divides the cores)
    root: str = "random"             # or a local timm checkpoint file to import the root from
    lease_ttl: float = 15.0
    heartbeat_every: float = 2.0
    bind_host: str = "127.0.0.1"
    data_dir: str | None = None


# Errors that mean the request was impossible (bad preset/task/data, task already leased): exit 2.
USER_ERRORS = (PresetError, TaskDataError, RootMismatch, CheckpointError, LeaseHeld, NotAStore)


class Agent:
    def __init__(self, opts: AgentOptions):
        self.opts = opts
        self.preset: Preset = resolve_preset(opts.preset, root=opts.root)
        self.vit: VitConfig = preset_vit(self.preset)
        self.agent_id = agent_id_for(opts.task)
        self.device = torch.device(opts.device)
        self.cycles = opts.cycles if opts.cycles is not None else self.preset.budget.cycles
        self.stop_requested = False
        self.lease_lost = False
        self.progress: dict = {"cycle": 0, "cycles": self.cycles, "generation": 0,
                               "generations": self.preset.budget.children_per_cycle, "children": 0,
                               "accepted": 0, "best_score": None, "best_quality": None,
                               "best_test": None, "params": None, "children_per_min": 0.0,
                               "last_event": "", "preset": self.preset.name}
        self._started = time.time()
        self.verbose = False
        self._population: list[Path] = []
        self._probe_cache: dict[str, float] = {}  # model id -> probe accuracy (+probe)

    # ---- set-up ------------------------------------------------------------------------------
    def _open(self) -> None:
        o = self.opts
        if o.threads:
            torch.set_num_threads(o.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.data = load_task(o.task, o.data_dir)
        self.tensors = TaskTensors(self.data, self.device, self.preset.budget.validation_examples)
        self.store = Store.open(o.store, create=True)
        ensure_root(self.store, self.preset, self.vit, seed=o.seed)
        self.bus = PeerBus(self.agent_id, host=o.bind_host)
        self.token = self.store.acquire_lease(
            self.agent_id, o.task, ttl=o.lease_ttl, host=socket.gethostname(), pid=os.getpid(),
            device=str(self.device), endpoint=self.bus.endpoint, preset=self.preset.name)
        self.view = SystemView(self.store, self.agent_id, self.device)
        self.scorer = Scorer(self.preset, self.vit)
        st = self.store.get_agent_state(self.agent_id)
        self.state = st or AgentState(self.agent_id, o.task, 0, 0, [], None, 0, 0, {}, time.time(), {})
        self.store.heartbeat(self.agent_id, self.token, ttl=o.lease_ttl, state="running",
                             progress=self._progress())
        self._peers()
        self.bus.send(Hello(agent_id=self.agent_id, task=o.task, endpoint=self.bus.endpoint,
                            pid=os.getpid(), host=socket.gethostname()))
        self._hb_stop = threading.Event()
        self._hb = threading.Thread(target=self._heartbeat_loop, daemon=True)
        self._hb.start()

    def _peers(self) -> None:
        self.bus.set_peers({a.agent_id: a.endpoint for a in self.store.live_agents()
                            if a.agent_id != self.agent_id and a.endpoint})

    def _progress(self) -> dict:
        mins = max(1e-9, (time.time() - self._started) / 60.0)
        self.progress["children_per_min"] = round(self.progress["children"] / mins, 2)
        snap = dict(self.progress)  # the lease thread packs this while the loop keeps updating
        snap["refresh_latencies_ms"] = list(snap.get("refresh_latencies_ms", ()))
        return snap

    def _heartbeat_loop(self) -> None:
        """Keeps the lease fresh even while a long child trains (main thread owns the bus)."""
        while not self._hb_stop.wait(self.opts.heartbeat_every):
            try:
                self.store.heartbeat(self.agent_id, self.token, ttl=self.opts.lease_ttl,
                                     progress=self._progress())
            except LeaseLost as exc:
                print(f"[{self.opts.task}] stopping: {exc}", flush=True)
                self.lease_lost = self.stop_requested = True
                return
            except Exception:  # a transient store error must not kill the lease thread
                continue

    # ---- messages ----------------------------------------------------------------------------
    def _on_step(self) -> bool:
        """Between training steps: react to peers' announcements; True abandons the child."""
        last = None
        for msg in self.bus.poll(0):
            if isinstance(msg, Published) and msg.agent_id != self.agent_id:
                last = msg
                self.progress["announcements"] = self.progress.get("announcements", 0) + 1
            elif isinstance(msg, Hello):
                self._peers()
        if last is not None:
            self.view.refresh()
            self._rescore(self._population)
            msg = last
            lat = (time.time() - msg.time) * 1000.0
            self.progress["refresh_latency_ms"] = round(lat, 2)
            recent = self.progress.setdefault("refresh_latencies_ms", [])
            recent.append(round(lat, 2))
            del recent[:-50]  # the last 50: enough for a median, small enough for every heartbeat
            self.progress["last_event"] = f"saw {msg.task} publish #{msg.seq}"
        return self.stop_requested

    # ---- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        self._open()
        try:
            while self.state.cycle < self.cycles and not self.stop_requested:
                self._run_cycle()
        except LeaseLost as exc:
            # Another agent took this task over (our heartbeats were late): it owns the task now,
            # and nothing of ours was written after the takeover (the store refused it).
            self.lease_lost = True
            print(f"[{self.opts.task}] stopping: {exc}", flush=True)
        finally:
            self._close()

    def _close(self) -> None:
        self._hb_stop.set()
        self._hb.join(timeout=5)
        state = "finished" if self.state.cycle >= self.cycles else "stopped"
        if not self.lease_lost:
            try:
                self.store.heartbeat(self.agent_id, self.token, ttl=self.opts.lease_ttl,
                                     state=state, progress=self._progress())
                self.store.release_lease(self.agent_id, self.token, state=state)
            except LeaseLost:
                pass
        self.bus.send(Bye(agent_id=self.agent_id, task=self.opts.task, reason=state))
        time.sleep(0.05)  # let the bye leave before LINGER cuts it
        self.bus.close()
        self.store.close()

    def _run_cycle(self) -> None:
        self.view.refresh()
        self._peers()
        population = [self.view.path(m) for m in self.state.population]
        self._population = population
        self._rescore(population)
        if self.verbose:
            print(f"[{self.opts.task}] cycle {self.state.cycle + 1}/{self.cycles} from generation "
                  f"{self.state.generation + 1} with preset {self.preset.name}; population: "
                  f"{', '.join(p.id for p in population) or 'empty (parents come from the system)'}",
                  flush=True)
        self.progress["cycle"] = self.state.cycle
        while self.state.generation < self.preset.budget.children_per_cycle:
            if self.stop_requested:
                return
            self._run_generation(population)
            self.view.prune(population)
        best = best_path(population)
        self.state.cycle += 1
        self.state.generation = 0
        self.state.population = [best.id] if best else []
        self.state.best_model_id = best.id if best else None
        self._commit(publish=best.id if best else None, event_kind="cycle_end",
                     event_data={"cycle": self.state.cycle})
        self.progress["cycle"] = self.state.cycle
        self.progress["last_event"] = f"cycle {self.state.cycle} done"

    def _rescore(self, population: list[Path]) -> None:
        """Rank own paths by their score *now*: other agents' publishes change the accounted params,
        and a path recorded under another preset (say, before +penalty) is judged by this one's."""
        for p in population:
            p.current_score = self.scorer.rescore(p, self.view.lockers)

    def _rng(self) -> tuple[random.Random, torch.Generator]:
        return generation_rng(self.opts.seed, self.agent_id, self.state.cycle, self.state.generation)

    def _run_generation(self, population: list[Path]) -> None:
        rng, gen = self._rng()
        mut = Mutator(self.preset, self.vit, rng, gen)
        best = best_path(population)
        ds, ds_fired = mut.sample_ds_hparams(best, self.data.num_classes)
        probed = []

        def pick(candidates):
            probed.append(True)
            return probe_pick(candidates, self.vit, self.tensors, rng, self._probe_cache)

        parent = select_parent(population, self.view.foreign_paths(), self.state.offsprings, rng,
                               pick=pick if self.preset.probe_parents else None)
        child_id = f"{self.agent_id}:m{self.state.next_model_id}"
        self.state.next_model_id += 1

        def next_cid() -> int:
            self.state.next_component_id += 1
            return self.state.next_component_id - 1

        child = mut.build_child(
            parent, ds, agent_id=self.agent_id, task=self.opts.task, child_id=child_id,
            next_component_id=next_cid, ancestors=self.view.ancestors, is_frozen=self.view.is_frozen,
            root_posemb=self.view.root.components["posembed_input"].params["pos_embedding"],
            device=self.device)
        child.mutations = ds_fired + child.mutations + (["select:probe"] if probed else [])
        if parent.agent == self.agent_id:
            self.state.offsprings[parent.id] = self.state.offsprings.get(parent.id, 0) + 1
        threshold = -math.inf
        if parent.task == self.opts.task:
            threshold = self.scorer.rescore(parent, self.view.lockers)
            threshold = -math.inf if threshold is None else threshold
        elif self.preset.guard_foreign and best is not None and best.score is not None:
            # +guard: a child of another task's model joins only if it already beats our best, so
            # the budget is not spent re-climbing from a fresh head.
            threshold = best.score
        b = self.preset.budget
        child_score = self.scorer.score_fn(child, self.view.lockers)
        steps_between = self.preset.steps_between_validations(self.tensors.n_train)
        schedule, lineage_start = None, 0
        child_steps = steps_between * b.validations_per_child
        agent_steps = self.cycles * b.children_per_cycle * child_steps
        if self.preset.continue_schedule:
            # One schedule over everything this agent will train, shared by a same-task lineage.
            if parent.task == self.opts.task:
                lineage_start = int(parent.metrics.get("lineage_steps", 0))
            schedule = (lineage_start, agent_steps)
        elif self.preset.clock_schedule:
            # The agent's budget is one schedule: a child trains at the agent's position in it, so
            # the last children of the last cycle anneal whatever lineage is best by then.
            done = self.state.cycle * b.children_per_cycle + self.state.generation
            schedule = (min(done * child_steps, agent_steps - child_steps), agent_steps)
        result, model = train_child(
            child, self.vit, self.tensors, batch_size=b.batch_size,
            steps_between_validations=steps_between,
            validations=b.validations_per_child, threshold=threshold,
            score_of=child_score, gen=gen, on_step=self._on_step, schedule=schedule)
        if result.aborted:
            return  # nothing of an abandoned child is written; the generation reruns on resume
        self.progress["children"] += 1
        publish = None
        trial_model = None
        new_components = []
        if result.improved:
            terms = self.scorer.size_terms(child, self.view.lockers)
            child.metrics = {"quality": result.quality, "score": result.score, **terms,
                             "num_cycles": self.state.cycle + 1, "steps": result.steps,
                             "lineage_steps": lineage_start + result.snapshot_step}
            child.created_at = time.time()
            population.append(child)
            population[:] = retain(population, b.max_population)
            if best_path(population) is child:
                child.metrics["test_quality"] = test_accuracy(model, self.tensors,
                                                              child.hparams["ds_image_size"])
                publish = child.id
            if child in population:
                new_components = [c for c in child.ordered() if not c.stored]
                trial_model = child
            self.progress["accepted"] += 1
        self.state.generation += 1
        self.state.population = [p.id for p in population]
        self.state.best_model_id = (best_path(population) or child).id if population else None
        trial = TrialRecord(
            id=child.id, agent=self.agent_id, task=self.opts.task, cycle=self.state.cycle,
            generation=self.state.generation - 1, parent=parent.id,
            model_id=trial_model.id if trial_model else None, mutations=list(child.mutations),
            hparams_diff=hparams_diff(parent.hparams, child.hparams), quality=result.quality,
            score=result.score if result.improved else (
                None if result.quality is None else child_score(result.quality)),
            accepted=result.improved, seconds=round(result.seconds, 4),
            train_images=result.train_images, preset=self.preset.name,
            preset_hash=self.preset.hash, created_at=time.time())
        try:
            self._commit(components=new_components, models=[trial_model] if trial_model else [],
                         trials=[trial], publish=publish)
        except MissingReference as exc:
            # `gc` removed something this child shares (an old model another agent replaced):
            # drop the child, forget cached paths, keep the trial and the counters.
            print(f"[{self.opts.task}] child {child.id} dropped: {exc}", flush=True)
            if trial_model is not None:
                population.remove(trial_model)
            self.state.population = [p.id for p in population]
            best = best_path(population)
            self.state.best_model_id = best.id if best else None
            trial = dataclasses.replace(trial, model_id=None, accepted=False)
            self.view.prune(population, forget_cached=True)
            self._commit(trials=[trial])
            return
        if publish:
            m = child.metrics
            self.progress.update(best_score=m["score"], best_quality=m["quality"],
                                 best_test=m["test_quality"], params=m["params"])
        self.progress["generation"] = self.state.generation
        if self.verbose:
            verdict = "PUBLISHED" if publish else ("kept" if trial_model else "dropped")
            q = "-" if result.quality is None else f"{result.quality:.4f}"
            print(f"[{self.opts.task}] cycle {self.state.cycle + 1}/{self.cycles} "
                  f"gen {self.state.generation}/{b.children_per_cycle}: {child.id} from {parent.id} "
                  f"q={q} {verdict} {result.seconds:.1f}s {' '.join(child.mutations) or '-'}",
                  flush=True)

    def _commit(self, *, components=(), models=(), trials=(), publish=None, event_kind="published",
                event_data=None) -> None:
        """One store transaction; the announcement goes out only after it committed."""
        self.state.updated_at = time.time()
        seq = self.store.commit(
            self.agent_id, self.token, components=[component_write(c) for c in components],
            models=[model_record(m) for m in models], state=self.state, publish=publish,
            trials=list(trials), event_kind=event_kind, event_data=event_data)
        for m in models:
            self.view.remember(m)
        if publish and seq is not None:
            m = self.view.path(publish).metrics
            self.bus.send(Published(agent_id=self.agent_id, task=self.opts.task, model_id=publish,
                                    seq=seq, score=m.get("score"), quality=m.get("quality")))
            self.progress["last_event"] = f"{event_kind} #{seq}"


def run_agent(opts: AgentOptions, verbose: bool = True) -> Agent:
    """Run one agent in this process until its cycles are done; SIGINT/SIGTERM finish cleanly."""
    agent = Agent(opts)
    agent.verbose = verbose

    def _stop(signum, frame):
        agent.stop_requested = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    agent.run()
    return agent


def agent_process_main(opts: AgentOptions, log_path: str) -> None:
    """Entry of a ``spawn``ed agent process: log to a file, map errors to exit codes (2 = user)."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    import sys

    sys.stdout = sys.stderr = log
    try:
        agent = run_agent(opts)
    except USER_ERRORS as exc:
        print(f"agent[{opts.task}]: error: {exc}", flush=True)
        sys.exit(2)
    if agent.lease_lost:
        sys.exit(1)  # superseded by another agent for this task

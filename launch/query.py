"""Query a munet-swarm store from the command line (read-only except `gc` and `release`).

    python launch/query.py --store DIR leaderboard [--json]
    python launch/query.py --store DIR show TASK [--json]
    python launch/query.py --store DIR verify
    python launch/query.py --store DIR events [--follow] [--after N] [--json]
    python launch/query.py --store DIR gc [--grace S] [--json]
    python launch/query.py --store DIR stats [--json]
    python launch/query.py --store DIR export TASK --out FILE.safetensors
    python launch/query.py --store DIR report --out FILE.html      # also writes FILE.json
    python launch/query.py --store DIR release TASK [--kind K]     # the lease of an agent that is gone

Exit codes: 0 ok; 1 internal failure or an inconsistent store; 2 user error (one line on stderr).
This script must stay torch-free so that it starts fast; each subcommand is one `cmd_*` function
registered in `SUBCOMMANDS`, so new ones (export, report) plug in the same way.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Sequence

if __name__ == "__main__":  # one module identity, so launch.query_views shares its helpers and errors
    sys.modules.setdefault("launch.query", sys.modules[__name__])

from launch.common import OneLineParser, run, run_main  # noqa: E402
from launch.query_views import (cmd_agents, cmd_release, cmd_trials, register_agents,  # noqa: E402
                                 register_release, register_trials)
from launch.report_cmd import cmd_report, register_report  # noqa: E402
from report.leaderboard import completed_cycles, leaderboard_rows  # noqa: E402
from store import MissingReference, StoreAPI, StoreError, is_remote  # noqa: E402
from store import open_store as _open_store  # noqa: E402
from store.codec import json_safe  # noqa: E402

DEFAULT_STORE = "swarm-store"
FOLLOW_POLL_SECONDS = 0.5



class UsageError(Exception):
    """A user mistake the CLI reports as one line with exit code 2."""


# ---- helpers ------------------------------------------------------------------------------------------

def open_store(args: argparse.Namespace, *, readonly: bool = True) -> StoreAPI:
    """Open an existing store, local or a service; never creates anything (a wrong path is a
    NotAStore error)."""
    return _open_store(args.store, readonly=readonly, create=False, keys=args.keys)




def print_json(value: Any) -> None:
    print(json.dumps(json_safe(value), indent=2, default=str))


def format_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def format_value(value: Any) -> str:
    """Compact human formatting for table cells."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if abs(value) >= 1000:  # counts (accounted params may be fractional): no decimals
            return f"{value:,.0f}"
        return f"{value:.4f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Left-aligned text table; numbers right-aligned."""
    cells = [[format_value(v) for v in row] for row in rows]
    numeric = [bool(rows) and all(isinstance(row[i], (int, float)) or row[i] is None
                                  for row in rows) for i in range(len(headers))]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if numeric[i] else v.ljust(w)
                         for i, (v, w) in enumerate(zip(values, widths))).rstrip()

    out = [line(headers), line(["-" * w for w in widths])]
    out.extend(line(r) for r in cells)
    return "\n".join(out)


# ---- leaderboard --------------------------------------------------------------------------------------

def brief_names(text: str) -> str:
    """A model's recorded class names (a JSON list) as one short line."""
    try:
        names = [str(n) for n in json.loads(text)]
    except (TypeError, ValueError):
        return str(text)[:80]
    return f"{len(names)}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}"


def cmd_leaderboard(args: argparse.Namespace) -> int:
    with open_store(args) as st:
        rows = leaderboard_rows(st)
    if args.json:
        print_json(rows)
        return 0
    headers = ["task", "model", "kind", "score", "quality", "test_q", "params", "acc_params", "flops",
               "layers", "adapters", "img", "shared", "foreign", "cycles", "model_cycle", "updated"]
    table = [[r["task"], r["model_id"], r["kind"] if not r["borrows"] else
              f"multipath({'+'.join(r['borrows'])})", r["score"], r["quality"], r["test_quality"],
              r["params"],
              r["accounted_params"], r["flops"], r["num_layers"], r["adapter_layers"] or "-",
              r["image_size"], f"{r['shared_components']}/{r['num_components']}",
              r["foreign_components"], r["cycles"], r["model_cycle"], format_time(r["updated_at"])]
             for r in rows]
    print(format_table(headers, table))
    if not rows:
        print("(no task has a published model yet)")
    return 0


# ---- show ---------------------------------------------------------------------------------------------

def describe_task(st: StoreAPI, task: str) -> dict[str, Any]:
    """The task's pointer, model and components (owner, size, which other tasks reuse them)."""
    pointer = st.get_task(task)
    if pointer is None:
        known = ", ".join(sorted(t.task for t in st.tasks())) or "none"
        raise UsageError(f"unknown task {task!r} (tasks with a published model: {known})")
    published = st.published_models()
    model = published[task]
    users: dict[str, list[str]] = {}
    for other_task, other in published.items():
        for cid in other.components:
            users.setdefault(cid, []).append(other_task)
    components = []
    for cid in model.components:
        record = st.get_component(cid)
        if record is None:
            raise MissingReference(f"model {model.id} refers to missing component {cid}")
        shapes = st.tensor_shapes(cid)
        components.append({
            "id": cid, "name": record.name, "agent": record.agent,
            "params": sum(math.prod(shape) for _, shape in shapes.values()),
            "has_momentum": bool(record.momentum), "cloned_from": record.cloned_from,
            "shared_with": sorted(t for t in users.get(cid, []) if t != task),
        })
    paths = []
    singles = st.published_models(kind="single") if model.refs else {}
    for slot, ref in enumerate(model.refs):  # a multipath model's frozen paths, main path first
        rec = st.get_model(ref)
        if rec is None:
            raise MissingReference(f"model {model.id} runs model {ref}, which is missing")
        single = singles.get(rec.task)
        standing = "root" if ref == st.root_model_id() else (
            "current" if single is not None and single.id == ref else "older, pinned")
        paths.append({"slot": slot, "model_id": ref, "task": rec.task, "owner": rec.agent,
                      "params": sum(math.prod(shape) for cid in rec.components
                                    for _, shape in st.tensor_shapes(cid).values()),
                      "standing": standing})
    kinds = [{"kind": p.kind, "model_id": p.model_id, "agent": p.agent, "score": p.score,
              "serves": p.model_id == pointer.model_id} for p in st.pointers() if p.task == task]
    return {"task": pointer.to_dict(), "model": model.to_dict(), "components": components,
            "paths": paths, "kinds": kinds,
            "cycles": completed_cycles(st, pointer.agent, model.metrics.get("num_cycles")),
            "model_cycle": model.metrics.get("num_cycles")}


def cmd_show(args: argparse.Namespace) -> int:
    with open_store(args) as st:
        info = describe_task(st, args.task)
    if args.json:
        print_json(info)
        return 0
    model, pointer = info["model"], info["task"]
    print(f"task {pointer['task']}: model {model['id']} by agent {pointer['agent']}, "
          f"published {format_time(pointer['updated_at'])}")
    print(f"  parent {model['parent'] or '-'}, preset {model['preset']} ({model['preset_hash']}), "
          f"created {format_time(model['created_at'])}, {pointer['num_classes']} classes")
    print(f"  the task's agent completed {info['cycles']} cycle(s); this model was made in cycle "
          f"{info['model_cycle']}")
    for title, values in (("metrics", model["metrics"]), ("hparams", model["hparams"])):
        print(f"{title}:")
        for key in sorted(values):
            print(f"  {key:<32} {format_value(values[key]) if key != 'class_names' else brief_names(values[key])}")
    print("components (forward order):")
    rows = [[c["id"], c["name"], c["agent"], c["params"], ", ".join(c["shared_with"]) or "-"]
            for c in info["components"]]
    table = format_table(["id", "name", "owner", "params", "also used by"], rows)
    print("\n".join("  " + line for line in table.splitlines()))
    if info["paths"]:
        print("paths (frozen whole models, pinned: they stay while this model lives):")
        rows = [[f"path_{p['slot']}", p["model_id"], p["task"], p["owner"], p["params"],
                 "main" if p["slot"] == 0 else "borrowed", p["standing"]]
                for p in info["paths"]]
        table = format_table(["slot", "model", "task", "owner", "params", "role", "standing"], rows)
        print("\n".join("  " + line for line in table.splitlines()))
    if len(info["kinds"]) > 1:
        print("the task's agents (the best score serves):")
        for k in info["kinds"]:
            print(f"  {k['kind']:<10} {k['model_id']:<32} score {format_value(k['score'])}"
                  f"{'  <- serves' if k['serves'] else ''}")
    return 0


# ---- verify, events, gc, stats ------------------------------------------------------------------------

def cmd_verify(args: argparse.Namespace) -> int:
    with open_store(args) as st:
        result = st.check()
    if result.ok:
        print(f"ok: {result.blobs} blobs, {result.components} components, {result.models} models "
              f"verified")
        return 0
    for problem in result.problems:
        print(problem)
    print(f"FAILED: {len(result.problems)} problem(s) in {args.store}", file=sys.stderr)
    return 1


def format_event(event: Any) -> str:
    return "  ".join([f"{event.seq:>6}", format_time(event.time), f"{event.kind:<14}",
                      f"{event.task or '-':<16}", f"{event.agent or '-':<16}",
                      event.model_id or "-"]).rstrip()


def cmd_events(args: argparse.Namespace) -> int:
    def emit(events: list) -> None:
        for event in events:
            line = json.dumps(json_safe(event.to_dict()), default=str) if args.json \
                else format_event(event)
            print(line, flush=True)

    if args.after < 0:
        raise UsageError(f"--after must be an event number >= 0, got {args.after}")
    if args.follow:  # Ctrl-C ends the follow even if this process inherited SIGINT as ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with open_store(args) as st:
        after = args.after
        try:
            while True:
                batch = st.events(after=after)
                emit(batch)
                if batch:
                    after = batch[-1].seq
                if not args.follow:
                    return 0
                time.sleep(FOLLOW_POLL_SECONDS)
        except KeyboardInterrupt:
            return 0


def cmd_gc(args: argparse.Namespace) -> int:
    if is_remote(args.store):
        raise UsageError("gc rewrites the LMDB file: run it on the store's host with --store DIR")
    with open_store(args, readonly=False) as st:
        counts = st.gc(grace_seconds=args.grace)
    if args.json:
        print_json(counts)
    else:
        print(f"gc: removed {counts['models']} models, {counts['components']} components, "
              f"{counts['blobs']} blobs ({counts['bytes_freed']:,} bytes)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with open_store(args) as st:
        info = st.stats()
    if args.json:
        print_json(info)
        return 0
    print(f"store {info['path']} (schema {info['schema_version']}, root {info['root_model_id']})")
    for name, count in info["counts"].items():
        print(f"  {name:<12} {count:>10,}")
    print(f"  blob bytes   {info['blob_bytes']:>10,}")
    print(f"  used         {info['used_bytes']:>10,} of map {info['map_size']:,} bytes "
          f"(file {info['file_bytes']:,})")
    print(f"  last event   {info['last_event_seq']:>10}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """One .safetensors file with the architecture in its metadata (agents.api.load_exported)."""
    from agents.export import export_task

    if os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a folder: give the file to write, e.g. "
                         f"{os.path.join(args.out, args.task + '.safetensors')}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"--out {args.out}: directory {folder} does not exist")
    with open_store(args) as st:
        info = export_task(st, args.task, args.out, fmt=args.format, kind=args.kind)
    print(f"exported {info['task']} model {info['model_id']}: {info['components']} components, "
          f"{info['tensors']} tensors, {info['bytes']:,} bytes -> {info['path']}")
    if info["timm_create_model"]:
        a = dict(info["timm_create_model"])
        name = a.pop("model_name")
        kwargs = ", ".join(f"{k}={v!r}" for k, v in a.items())
        print(f"load it with timm: m = timm.create_model({name!r}, {kwargs}); "
              f"m.load_state_dict(safetensors.torch.load_file({info['path']!r}))")
    return 0


# ---- argument parsing ---------------------------------------------------------------------------------

def _add_store_flag(parser: argparse.ArgumentParser, default: Any) -> None:
    parser.add_argument("--store", default=default, metavar="DIR|tcp://HOST:PORT",
                        help=f"store directory (default: {DEFAULT_STORE}), or a store service at "
                             f"tcp://HOST:PORT (launch/serve_store.py)")
    keys = os.environ.get("MUNET_STORE_KEYS") if default is not argparse.SUPPRESS else default
    parser.add_argument("--keys", default=keys, metavar="KEYDIR",
                        help="CURVE key folder for a store service beyond loopback "
                             "(default $MUNET_STORE_KEYS)")


def register_leaderboard(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("leaderboard", help="current model of every task")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    return p


def register_show(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="one task's model, hparams, metrics and components")
    p.add_argument("task")
    p.add_argument("--json", action="store_true")
    return p


def register_verify(sub: Any) -> argparse.ArgumentParser:
    return sub.add_parser("verify", help="re-hash blobs and check every reference")


def register_events(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("events", help="print the event log")
    p.add_argument("--follow", action="store_true", help="keep printing new events (Ctrl-C ends)")
    p.add_argument("--after", type=int, default=0, metavar="N", help="only events with seq > N")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    return p


def register_gc(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("gc", help="delete models, components and blobs nothing live needs")
    p.add_argument("--grace", type=float, default=3600.0, metavar="S",
                   help="keep anything created in the last S seconds (default 3600)")
    p.add_argument("--json", action="store_true")
    return p


def register_stats(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("stats", help="record counts and space used")
    p.add_argument("--json", action="store_true")
    return p


def register_export(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a task's current model to one .safetensors file")
    p.add_argument("task")
    p.add_argument("--out", required=True, metavar="FILE", help="output .safetensors path")
    p.add_argument("--format", choices=("munet", "timm"), default="munet",
                   help="munet (default: agents.api.load_exported reads it) or timm (timm's "
                        "VisionTransformer state-dict names plus its create_model arguments in the "
                        "metadata; models without residual adapters only)")
    p.add_argument("--kind", choices=("single", "multipath"), default=None,
                   help="the model that agent kind publishes for the task (single: the single-path "
                        "model, also while a multipath model serves the task); default: the model "
                        "that serves the task")
    return p


#: (register, command) pairs; a new subcommand adds one entry here
SUBCOMMANDS: list[tuple[Callable[[Any], argparse.ArgumentParser],
                        Callable[[argparse.Namespace], int]]] = [
    (register_leaderboard, cmd_leaderboard),
    (register_show, cmd_show),
    (register_verify, cmd_verify),
    (register_events, cmd_events),
    (register_gc, cmd_gc),
    (register_stats, cmd_stats),
    (register_export, cmd_export),
    (register_report, cmd_report),
    (register_agents, cmd_agents),
    (register_trials, cmd_trials),
    (register_release, cmd_release),
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="query.py", description=__doc__.split("\n\n")[0])
    _add_store_flag(parser, default=os.environ.get("MUNET_STORE", DEFAULT_STORE))
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for register, command in SUBCOMMANDS:
        p = register(sub)
        _add_store_flag(p, default=argparse.SUPPRESS)  # also accepted after the subcommand
        p.set_defaults(func=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # a read tool: any store error it meets (read-only, no such model, ...) is the user's to fix
    return run(lambda: args.func(args), "query.py", user_errors=(UsageError, StoreError))


if __name__ == "__main__":
    run_main(main, "query.py")

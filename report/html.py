"""The report dict (``report.build.build_report``) as one self-contained HTML page.

No external resources and no JavaScript: styles are inline in ``<style>``, figures are inline SVG
(``report.svg``), tooltips are SVG ``<title>`` elements. Everything drawn comes from the
report dict, so the page shows exactly the numbers of the JSON file written beside it.
"""
from __future__ import annotations

import datetime as _dt
from html import escape
from typing import Any, Callable, Sequence

from agents import registry
from report import svg
from report.build import NO_ACTION

_CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f8fafc;color:#1f2937;
  font:14px/1.45 system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif}
main{max-width:1320px;margin:0 auto;padding:28px 32px 48px}
h1{font-size:26px;margin:0 0 4px} h2{font-size:19px;margin:0 0 4px}
h3{font-size:15px;margin:18px 0 6px}
.sub{color:#6b7280;margin:0 0 18px} .note{color:#6b7280;margin:4px 0 12px;max-width:980px}
section{background:white;border:1px solid #e5e7eb;border-radius:10px;padding:20px 22px;
  margin:18px 0}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:14px 0 4px}
.card{background:white;border:1px solid #e5e7eb;border-radius:10px;padding:10px 16px;
  min-width:118px}
.card b{display:block;font-size:22px} .card span{color:#6b7280;font-size:12px}
table{border-collapse:collapse;width:100%;font-size:13px;margin:8px 0}
th,td{padding:5px 7px;border-bottom:1px solid #eef0f3;text-align:left;white-space:nowrap}
th{background:#f3f4f6;font-weight:600;color:#374151;white-space:normal;vertical-align:bottom}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
tr.first td{border-top:1px solid #d1d5db}
td{vertical-align:top} code.hash{color:#6b7280;font-size:11px;margin-left:17px}
.sw{display:inline-block;width:11px;height:11px;border-radius:3px;margin-right:6px;
  vertical-align:-1px}
.legend{display:flex;flex-wrap:wrap;gap:6px 18px;margin:6px 0 10px;color:#374151;font-size:13px}
.grid2{display:grid;grid-template-columns:repeat(auto-fill,minmax(585px,1fr));gap:10px 20px}
.bars{display:flex;flex-wrap:wrap;gap:10px 26px;margin:10px 0 6px}
.scroll{overflow-x:auto}
dl{display:grid;grid-template-columns:180px 1fr;gap:4px 14px;margin:8px 0;color:#374151}
dt{font-weight:600}
"""


# ---- formatting ----------------------------------------------------------------------------------

def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()
                                  and abs(value) >= 1000):
        return f"{int(value):,}"
    return f"{value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "–" if value is None else f"{value:+.3f}"


def _pct(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if 0 < abs(value) < 0.095 else f"{100 * value:.0f}%"


def _count(value: float | None) -> str:
    """1.49M / 730k style, for parameters and images."""
    if value is None:
        return "–"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _flops(value: float | None) -> str:
    """FLOPs as 104G / 2.85T / 1.2P ('–' when unknown)."""
    if value is None:
        return "–"
    for unit, size in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.0f}"


def _short_id(model_id: str) -> str:
    """``agent~mnist5k:m3`` -> ``mnist5k:m3`` (agent ids carry a fixed prefix)."""
    return model_id[len("agent~"):] if model_id.startswith("agent~") else model_id


def _model_cell(model_id: str, task: str) -> str:
    """The model's own number when its id just repeats the task (full id on hover)."""
    short = _short_id(model_id)
    shown = short[len(task) + 1:] if short.startswith(f"{task}:") else short
    return f"<span title='{escape(model_id)}'>{escape(shown)}</span>"


def _when(ts: float | None) -> str:
    if ts is None:
        return "–"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _swatch(colour: str) -> str:
    return f"<span class='sw' style='background:{colour}'></span>"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: Sequence[bool],
           group_starts: frozenset[int] = frozenset()) -> str:
    """Cells are already-escaped HTML strings; rows in ``group_starts`` get a separator above."""
    head = "".join(f"<th class='n'>{escape(h)}</th>" if n else f"<th>{escape(h)}</th>"
                   for h, n in zip(headers, numeric))
    body = "".join(("<tr class='first'>" if i in group_starts else "<tr>")
                   + "".join(f"<td class='n'>{c}</td>" if n else f"<td>{c}</td>"
                             for c, n in zip(row, numeric)) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<div class='scroll'><table><tr>{head}</tr>{body}</table></div>"


class _Colours:
    """One colour per task (creators take their task's colour) and one per preset."""

    def __init__(self, report: dict) -> None:
        tasks = sorted({t["task"] for t in report["tasks"]} | set(report["timeline"]))
        self.task = svg.palette_map(tasks, svg.TASK_PALETTE)
        self.preset = svg.palette_map([p["name"] for p in report["presets"]],
                                      svg.PRESET_PALETTE)
        self.agents: dict[str, str] = report.get("agents", {})

    def of_task(self, task: str) -> str:
        return svg.ROOT_COLOUR if task == "root" else self.task.get(task, svg.ROOT_COLOUR)

    def of_preset(self, preset: str) -> str:
        return self.preset.get(preset, svg.ROOT_COLOUR)

    def of_agent(self, agent: str) -> str:
        return self.of_task(self.agents.get(agent, "root" if agent == "root" else agent))

    def agent_label(self, agent: str) -> str:
        return self.agents.get(agent, agent)


# ---- sections ------------------------------------------------------------------------------------

def _summary(report: dict) -> str:
    s = report["summary"]
    cards = [("tasks", s["tasks"]), ("agents", s["agents"]), ("models", s["models"]),
             ("trained children", s["trials"]), ("events", s["events"]),
             ("components", s["components"]), ("presets", s["presets"]),
             ("stored tensor bytes", _count(s["blob_bytes"]))]
    html = "".join(f"<div class='card'><b>{escape(str(_num(v) if isinstance(v, int) else v))}"
                   f"</b><span>{escape(k)}</span></div>" for k, v in cards)
    return f"<div class='cards'>{html}</div>"


def _leaderboard(report: dict, colours: _Colours) -> str:
    headers = ["task", "model", "kind", "preset", "score", "quality", "test q.", "params",
               "accounted", "own", "GFLOPs", "layers", "adapters", "image", "cycles", "model cycle",
               "children", "train images", "train FLOPs", "FLOPs / accepted", "published at"]
    numeric = [False, False, False, False] + [True] * 17
    rows = []
    for t in report["tasks"]:
        flops = t["flops"] / 1e9 if isinstance(t["flops"], (int, float)) else None
        rows.append([f"{_swatch(colours.of_task(t['task']))}<b>{escape(t['task'])}</b>",
                     _model_cell(t["model_id"], t["task"]),
                     escape(t["kind"] + (f" ({', '.join(t['borrows'])})" if t["borrows"] else "")),
                     f"{_swatch(colours.of_preset(t['preset']))}{escape(t['preset'])}",
                     _num(t["score"], 4), _num(t["quality"], 4), _num(t["test_quality"], 4),
                     _count(t["params"]), _count(t["accounted_params"]), _count(t["own_params"]),
                     _num(flops, 4), _num(t["num_layers"]),
                     escape(f"{len(ids)} at {','.join(map(str, ids))}" if (ids := registry.parse_layer_ids(
                         t["adapter_layers"], strict=False)) else "–"), _num(t["image_size"]),
                     _num(t["cycles"]), _num(t["model_cycle"]), _num(t.get("children")),
                     _count(t.get("train_images")),
                     _flops(t.get("train_flops")), _flops(t.get("flops_per_accepted_child")),
                     f"<span title='{escape(_when(t['updated_at']))}'>"
                     f"{escape(_when(t['updated_at'])[11:])}</span>"])
    if not rows:
        return "<p class='note'>No task has a published model yet.</p>"
    return _table(headers, rows, numeric)


def _timeline_figures(report: dict, colours: _Colours) -> str:
    timeline, children = report["timeline"], report["children"]
    ends = [e["t"] for events in timeline.values() for e in events] + \
        [c["t"] for pts in children.values() for c in pts]
    x_max = max(ends + [1.0])
    current = {t["task"] for t in report["tasks"]}
    overview = []
    for task in sorted(timeline):
        pub = [e for e in timeline[task] if e["kind"] == "published" and e["score"] is not None]
        if not pub:
            continue
        overview.append(svg.Series(
            task, colours.of_task(task), [(e["t"], e["score"]) for e in pub], marker="circle",
            extend_to=x_max if task in current else None,
            tips=[f"{e['model_id']} published at {svg.format_duration(e['t'])}: score "
                  f"{e['score']:.4f} ({e['preset']})" for e in pub]))
    parts = [svg.line_chart(overview, width=1200, height=300, y_label="score",
                            x_label="time since the system started", x_max=x_max,
                            title="Published score of every task")]
    publishing = {e["preset"] for events in timeline.values() for e in events
                  if e["kind"] == "published"}
    legend = [f"{_swatch(colours.of_preset(p))}published by {escape(p)}"
              for p in colours.preset if p in publishing]
    legend += ["<span>— score of the served model</span>",
               "<span>‑ ‑ its validation quality</span>",
               "<span>● accepted child · ○ rejected child (validation quality)</span>"]
    parts.append(f"<div class='legend'>{''.join(f'<span>{x}</span>' for x in legend)}</div>")
    small = []
    for task in sorted(timeline):
        colour = colours.of_task(task)
        pub = [e for e in timeline[task] if e["kind"] == "published" and e["score"] is not None]
        extend = x_max if task in current else None
        series = [svg.Series("score", colour, [(e["t"], e["score"]) for e in pub],
                             extend_to=extend),
                  svg.Series("quality", colour, [(e["t"], e["quality"]) for e in pub
                                                 if e["quality"] is not None],
                             dash="5 4", width=1.4, opacity=0.7, extend_to=extend)]
        for accepted in (True, False):
            pts = [c for c in children.get(task, [])
                   if c["accepted"] == accepted and c["quality"] is not None]
            series.append(svg.Series(
                "child", "#6b7280", [(c["t"], c["quality"]) for c in pts], line=False,
                marker="circle" if accepted else "ring", marker_size=3.0, opacity=0.75,
                in_legend=False, tips=[f"child {c['id']} ({c['preset']}): quality "
                                       f"{c['quality']:.4f}, "
                                       f"{'accepted' if accepted else 'rejected'}" for c in pts]))
        for preset in colours.preset:
            pts = [e for e in pub if e["preset"] == preset]
            if pts:
                series.append(svg.Series(
                    preset, colours.of_preset(preset), [(e["t"], e["score"]) for e in pts],
                    line=False, marker="diamond", marker_size=5.5, in_legend=False,
                    tips=[f"published {e['model_id']} ({preset}): score {e['score']:.4f}"
                          for e in pts]))
        small.append(svg.line_chart(series, width=595, height=230, title=task, legend=False,
                                    x_max=x_max, y_label="accuracy / score"))
    parts.append(f"<div class='grid2'>{''.join(small)}</div>")
    return "".join(parts)


def _sharing(report: dict, colours: _Colours) -> str:
    sharing = report["sharing"]
    if not sharing["tasks"]:
        return "<p class='note'>No task has a published model yet.</p>"
    notes = {t["task"]: f"{_count(t['params'])} params · {_pct(t['own_params'] / t['params'])}"
             f" own" for t in report["tasks"] if t["params"]}
    for task, borrowed in sharing.get("borrows", {}).items():  # multipath: whole frozen models
        notes[task] = f"multipath: its own model + {', '.join(borrowed)} (frozen), router"
    grid = svg.sharing_grid(sharing, colours.of_agent, colours.agent_label, row_notes=notes)
    comps = sharing["components"]
    shared = [c for c in comps if len(c["used_by"]) > 1]
    in_use = sum(c["params"] * len(c["used_by"]) for c in comps)
    in_shared = sum(c["params"] * len(c["used_by"]) for c in shared)
    unique = sum(c["params"] for c in comps)
    creators = sorted({c["creator"] for c in comps}, key=lambda a: (a != "root", a))
    legend = "".join(f"<span>{_swatch(colours.of_agent(a))}created by "
                     f"{escape(colours.agent_label(a) if a != 'root' else 'the root')}</span>"
                     for a in creators)
    legend += ("<span><span class='sw' style='background:#9ca3af;outline:2px solid #1f2937'>"
               "</span>outlined, with a count: shared by that many tasks</span>")
    share = _pct(in_shared / in_use if in_use else None)
    return (f"<p class='note'>{len(comps)} components serve the current models and {len(shared)} "
            f"of them are shared by two or more tasks: {share} of the parameters the served "
            f"models use sit in shared components, so {_count(in_use)} parameters in use are "
            f"{_count(unique)} stored. Hover "
            f"a cell for its id, creator and size.</p><div class='legend'>{legend}</div>"
            f"<div class='scroll'>{grid}</div>")


def _lineage(report: dict, colours: _Colours) -> str:
    parts = []
    for i, t in enumerate(report["tasks"]):
        chain = t["lineage"]
        tasks = [n["task"] for n in chain if not n.get("missing") and n["task"] not in
                 ("root", t["task"])]
        via = sorted(set(tasks))
        hop = f" · inherits from {', '.join(map(escape, via))}" if via else ""
        parts.append(f"<h3>{_swatch(colours.of_task(t['task']))}{escape(t['task'])} "
                     f"<span style='font-weight:400;color:#6b7280'>· {len(chain) - 1} ancestors"
                     f"{hop}</span></h3>")
        parts.append(svg.lineage_chain(chain, colours.of_task, colours.of_preset, uid=f"l{i}"))
    return "".join(parts) or "<p class='note'>No task has a published model yet.</p>"


def _method(report: dict, colours: _Colours) -> str:
    presets = report["presets"]
    if not presets:
        return "<p class='note'>No child has been trained yet.</p>"

    def bars(title: str, value: Callable[[dict], float | None], fmt: Callable[[float], str]) -> str:
        rows = [(p["name"], value(p), colours.of_preset(p["name"])) for p in presets]
        return svg.bar_chart(rows, title=title, width=272, value_format=fmt)

    figures = [
        bars("acceptance rate", lambda p: p["acceptance_rate"], _pct),
        bars("mean score gain (accepted)", lambda p: p["mean_score_gain"], _signed),
        bars("mean quality gain (accepted)", lambda p: p["mean_quality_gain"], _signed),
        bars("train images per accepted child",
             lambda p: p["train_images"] / p["accepted"] if p["accepted"] else None, _count),
        bars("train FLOPs per accepted child", lambda p: p.get("flops_per_accepted_child"), _flops)]
    headers = ["preset", "method", "children", "accepted", "rate", "foreign", "score gain",
               "quality gain", "gain n", "published", "train images", "train FLOPs",
               "FLOPs / accepted", "seconds", "best score"]
    numeric = [False, False] + [True] * 12 + [False]
    rows = []
    for p in presets:
        method = p["method"] + "".join(f" +{e}" for e in p["extensions"])
        best = "<br>".join(f"{escape(k)} {v:.3f}" for k, v in p["best_score"].items()) or "–"
        rows.append([f"{_swatch(colours.of_preset(p['name']))}<b>{escape(p['name'])}</b><br>"
                     f"<code class='hash'>{escape(p['hash'])}</code>", escape(method),
                     _num(p["trials"]), _num(p["accepted"]),
                     _pct(p["acceptance_rate"]), _num(p["accepted_foreign"]),
                     _signed(p["mean_score_gain"]), _signed(p["mean_quality_gain"]),
                     _num(p["gain_n"]), _num(p["published"]), _num(p["train_images"]),
                     _flops(p.get("train_flops")), _flops(p.get("flops_per_accepted_child")),
                     _num(p["seconds"], 1), best])
    html = [f"<div class='bars'>{''.join(figures)}</div>", "<h3>Per preset</h3>",
            _table(headers, rows, numeric), "<h3>Per mutation action and preset</h3>",
            "<p class='note'>A child that applied several actions counts in each of their rows, "
            "so these rows add up to more than the preset totals.</p>"]
    a_headers = ["action", "preset", "children", "accepted", "rate", "foreign", "score gain",
                 "quality gain", "gain n", "train images", "train FLOPs", "seconds"]
    a_rows, previous, starts = [], None, set()
    for a in report["actions"]:
        first = a["action"] != previous
        previous = a["action"]
        if first and a_rows:
            starts.add(len(a_rows))
        label = f"{a['action']}: retrain only" if a["action"] == NO_ACTION else a["action"]
        what = f"<br><span class='note'>{escape(a['label'])}</span>" if a.get("label") else ""
        a_rows.append([f"<b>{escape(label)}</b>{what}" if first else "",
                       f"{_swatch(colours.of_preset(a['preset']))}{escape(a['preset'])}",
                       _num(a["children"]), _num(a["accepted"]), _pct(a["acceptance_rate"]),
                       _num(a["accepted_foreign"]), _signed(a["mean_score_gain"]),
                       _signed(a["mean_quality_gain"]), _num(a["gain_n"]),
                       _num(a["train_images"]), _flops(a.get("train_flops")), _num(a["seconds"], 1)])
    html.append(_table(a_headers, a_rows, [False, False] + [True] * 10, frozenset(starts)))
    return "".join(html)


_DEFINITIONS = """<dl>
<dt>accepted</dt><dd>the child's best validation score reached its parent's current score.
Children of another task's model (or of the root) are always accepted and counted as
<i>foreign</i>.</dd>
<dt>score / quality gain</dt><dd>mean of child minus parent (recorded metrics) over accepted
children whose parent belongs to the same task (<i>gain n</i> of them). Quality is validation
accuracy; the score also carries the size/compute penalty when a preset switches it on, so compare
quality gains across presets with and without <code>+penalty</code>.</dd>
<dt>compute</dt><dd>training images, wall seconds and training FLOPs that the trained children
recorded. FLOPs count training steps (forward and backward; a frozen component runs forward only, a
cached frozen prefix is free), validations and prefix-cache fills; <i>FLOPs / accepted</i> is all of
them over the accepted children; – where a child recorded none (trained before children did).</dd>
<dt>preset</dt><dd><code>BUDGET[@base][+ext...]</code>: budget, base or default method, extensions
layered on top; the hash identifies the fully resolved configuration.</dd>
</dl>"""


def render_html(report: dict) -> str:
    """The whole page as one string."""
    colours = _Colours(report)
    s = report["summary"]
    sections = [
        ("Leaderboard", "The model each task serves now.", _leaderboard(report, colours)),
        ("Score and quality over time", "Every publish moves a task's served model; the dots "
         "are all trained children. Hover markers for details.",
         _timeline_figures(report, colours)),
        ("System graph: which components each task uses", "Rows are tasks, columns the "
         "components of their current models in forward order; a cell's colour is the agent "
         "that created the component.", _sharing(report, colours)),
        ("Lineage of the current models", "From the root (left) to the served model (right); "
         "a box's colour is the task its model belongs to, so colour changes are knowledge "
         "moving between tasks. The dot and label below give the preset that trained it.",
         _lineage(report, colours)),
        ("What each method extension bought", "Measured on the live system: every trained "
         "child is recorded with its preset and the mutation actions it applied.",
         _method(report, colours) + _DEFINITIONS),
    ]
    body = "".join(f"<section><h2>{escape(title)}</h2><p class='note'>{escape(note)}</p>"
                   f"{content}</section>" for title, note, content in sections)
    title = "munet-swarm · continual-development report"
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body><main>"
            f"<h1>{escape(title)}</h1><p class='sub'>store <code>{escape(report['store'])}"
            f"</code> · system started {escape(_when(s['started_at']))} · report generated "
            f"{escape(_when(report['generated_at']))}</p>{_summary(report)}{body}"
            "</main></body></html>")

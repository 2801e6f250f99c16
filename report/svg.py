"""Inline SVG figures for the report page, drawn by hand (no plotting library, no JavaScript).

Every function returns one ``<svg>`` element as a string, sized in CSS pixels, with its text
escaped. Hover tooltips use SVG ``<title>`` children, which browsers show without any script. Text
widths are estimated (``_text_width``) because nothing here can measure fonts; labels are kept
short for that.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape
from typing import Callable, Sequence

from agents import registry

FONT = "font-family='system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif'"
INK, MUTED, GRID, EMPTY = "#1f2937", "#6b7280", "#e5e7eb", "#f3f4f6"
ROOT_COLOUR = "#9ca3af"
#: categorical colours for tasks (creators take their task's colour); distinct in hue and lightness
TASK_PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2",
                "#65a30d", "#4f46e5", "#ea580c", "#0d9488", "#a21caf")
#: colours for presets (method extensions), kept apart from the task colours by being darker/odd
PRESET_PALETTE = ("#111827", "#f59e0b", "#14b8a6", "#e11d48", "#8b5cf6", "#84cc16", "#0ea5e9",
                  "#f97316")


def palette_map(names: Sequence[str], palette: Sequence[str]) -> dict[str, str]:
    """Stable name -> colour (cycling when there are more names than colours)."""
    return {name: palette[i % len(palette)] for i, name in enumerate(names)}


def tint(colour: str, amount: float) -> str:
    """Mix ``#rrggbb`` with white (amount 0 = colour, 1 = white): light fills for boxes."""
    r, g, b = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    mix = [round(c + (255 - c) * amount) for c in (r, g, b)]
    return "#" + "".join(f"{c:02x}" for c in mix)


def _text_width(text: str, size: float = 11) -> float:
    return len(text) * size * 0.58


def _t(x: float, y: float, text: str, *, size: float = 11, fill: str = INK, anchor: str = "start",
       weight: str = "normal", extra: str = "") -> str:
    return (f"<text x='{x:.1f}' y='{y:.1f}' font-size='{size}' fill='{fill}' "
            f"text-anchor='{anchor}' font-weight='{weight}' {extra}>{escape(text)}</text>")


def _svg(width: float, height: float, body: list[str], label: str) -> str:
    # no xmlns: inside HTML the parser puts <svg> in the SVG namespace, and the page then holds
    # no URL at all (the tests check that it names no http(s) resource)
    return (f"<svg width='{width:.0f}' height='{height:.0f}' "
            f"viewBox='0 0 {width:.0f} {height:.0f}' role='img' aria-label='{escape(label)}' "
            f"{FONT}>" + "".join(body) + "</svg>")


# ---- axes ----------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, target)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    value = first
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    return ticks


def duration_ticks(hi: float, target: int = 6) -> list[float]:
    """Ticks in seconds that read well as durations (10 s, 30 s, 1 min, 5 min, 1 h, ...)."""
    steps = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)
    longest = steps[-1] * math.ceil(hi / steps[-1] / target)  # multi-day runs: whole days
    step = next((s for s in steps if hi / s <= target), longest)
    return [i * step for i in range(int(hi // step) + 1)]


def format_duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m" + (f"{s % 60:02d}s" if s % 60 else "")
    return f"{s // 3600}h" + (f"{(s % 3600) // 60:02d}m" if s % 3600 else "")


# ---- line charts ---------------------------------------------------------------------------------

@dataclass
class Series:
    """One line and/or set of markers on a chart.

    ``step``: the value holds until the next point (a published score is piecewise constant);
    ``extend_to``: continue the last value to this x (the system still serves that model now).
    """

    label: str
    colour: str
    points: list[tuple[float, float]]
    line: bool = True
    step: bool = True
    dash: str = ""
    width: float = 2.0
    marker: str = ""            # "", "circle", "ring" (hollow circle), "diamond"
    marker_size: float = 3.5
    opacity: float = 1.0
    extend_to: float | None = None
    in_legend: bool = True
    tips: list[str] = field(default_factory=list)  # one tooltip per point (optional)


def _marker(kind: str, x: float, y: float, r: float, colour: str, opacity: float, tip: str) -> str:
    title = f"<title>{escape(tip)}</title>" if tip else ""
    if kind == "diamond":
        pts = f"{x:.1f},{y - r:.1f} {x + r:.1f},{y:.1f} {x:.1f},{y + r:.1f} {x - r:.1f},{y:.1f}"
        return (f"<polygon points='{pts}' fill='{colour}' stroke='white' stroke-width='1' "
                f"opacity='{opacity}'>{title}</polygon>")
    fill = "white" if kind == "ring" else colour
    return (f"<circle cx='{x:.1f}' cy='{y:.1f}' r='{r}' fill='{fill}' stroke='{colour}' "
            f"stroke-width='1.3' opacity='{opacity}'>{title}</circle>")


def _legend(series: Sequence[Series], x0: float, y0: float, max_x: float
            ) -> tuple[list[str], float]:
    """Legend entries in rows starting at (x0, y0); returns the elements and the height used."""
    out, x, y = [], x0, y0
    for s in (s for s in series if s.in_legend):
        w = 34 + _text_width(s.label)
        if x + w > max_x and x > x0:
            x, y = x0, y + 18
        if s.line:
            dash = f" stroke-dasharray='{s.dash}'" if s.dash else ""
            out.append(f"<line x1='{x:.1f}' y1='{y:.1f}' x2='{x + 22:.1f}' y2='{y:.1f}' "
                       f"stroke='{s.colour}' stroke-width='{s.width}'{dash}/>")
        if s.marker:
            out.append(_marker(s.marker, x + 11, y, s.marker_size, s.colour, 1.0, ""))
        out.append(_t(x + 28, y + 4, s.label, fill=INK))
        x += w + 12
    return out, (y - y0 + 18 if out else 0)


def robust_range(ys: Sequence[float], outlier_factor: float = 1.5) -> tuple[float, float]:
    """The y range of a chart: every point, padded 8%, unless a few low outliers would flatten the
    rest. Then the floor is the 5th percentile (with ten points or more, and only when the minimum
    lies more than ``outlier_factor`` x the percentile-to-max span below it); the outliers are drawn
    on the axis (``line_chart`` clamps them)."""
    if not ys:
        return 0.0, 1.0
    lo, hi = min(ys), max(ys)
    if len(ys) >= 10:
        p5 = sorted(ys)[len(ys) // 20]
        if p5 - lo > outlier_factor * (hi - p5) and hi > p5:
            lo = p5
    pad = (hi - lo) * 0.08 or 0.05
    return max(0.0, lo - pad), hi + pad


def line_chart(series: Sequence[Series], *, width: float = 620, height: float = 260,
               title: str = "", x_label: str = "", y_label: str = "",
               x_max: float | None = None, y_range: tuple[float, float] | None = None,
               y_format: Callable[[float], str] = lambda v: f"{v:g}",
               legend: bool = True) -> str:
    """A time chart: x is seconds since the system started, y a score-like value."""
    xs = [p[0] for s in series for p in s.points] + [s.extend_to or 0 for s in series]
    ys = [p[1] for s in series for p in s.points]
    x_hi = max([x_max or 0.0, *xs, 1.0])
    if y_range is None:
        y_range = robust_range(ys)
    left, right = 54, 16
    body: list[str] = []
    top = 10
    if title:
        body.append(_t(left, 18, title, size=13, weight="600"))
        top = 30
    if legend:
        items, used = _legend(series, left, top + 4, width - right)
        body += items
        top += used + 4
    bottom = height - 40
    plot_w, plot_h = width - left - right, bottom - top
    y_lo, y_hi = y_range

    def px(x: float) -> float:
        return left + plot_w * x / x_hi

    def py(y: float) -> float:  # a point outside the range sits on the axis it left by
        y = min(max(y, y_lo), y_hi)
        return bottom - plot_h * (y - y_lo) / ((y_hi - y_lo) or 1.0)

    for tick in nice_ticks(y_lo, y_hi, 5):
        body.append(f"<line x1='{left}' y1='{py(tick):.1f}' x2='{left + plot_w}' "
                    f"y2='{py(tick):.1f}' stroke='{GRID}'/>")
        body.append(_t(left - 6, py(tick) + 4, y_format(tick), size=10, fill=MUTED, anchor="end"))
    for tick in duration_ticks(x_hi):
        body.append(f"<line x1='{px(tick):.1f}' y1='{bottom}' x2='{px(tick):.1f}' "
                    f"y2='{bottom + 4}' stroke='{MUTED}'/>")
        body.append(_t(px(tick), bottom + 16, format_duration(tick), size=10, fill=MUTED,
                       anchor="middle"))
    body.append(f"<line x1='{left}' y1='{bottom}' x2='{left + plot_w}' y2='{bottom}' "
                f"stroke='{MUTED}'/>")
    body.append(f"<line x1='{left}' y1='{top}' x2='{left}' y2='{bottom}' stroke='{MUTED}'/>")
    if x_label:
        body.append(_t(left + plot_w / 2, height - 6, x_label, size=11, fill=MUTED,
                       anchor="middle"))
    if y_label:
        body.append(_t(14, top + plot_h / 2, y_label, size=11, fill=MUTED, anchor="middle",
                       extra=f"transform='rotate(-90 14 {top + plot_h / 2:.1f})'"))
    for s in series:
        pts = sorted(s.points, key=lambda p: p[0]) if s.line else list(s.points)
        if s.line and pts:
            coords = []
            for i, (x, y) in enumerate(pts):
                if s.step and i:
                    coords.append(f"{px(x):.1f},{py(pts[i - 1][1]):.1f}")
                coords.append(f"{px(x):.1f},{py(y):.1f}")
            if s.extend_to is not None and s.extend_to > pts[-1][0]:
                coords.append(f"{px(s.extend_to):.1f},{py(pts[-1][1]):.1f}")
            dash = f" stroke-dasharray='{s.dash}'" if s.dash else ""
            body.append(f"<polyline points='{' '.join(coords)}' fill='none' stroke='{s.colour}' "
                        f"stroke-width='{s.width}' opacity='{s.opacity}' "
                        f"stroke-linejoin='round'{dash}/>")
        if s.marker:
            for i, (x, y) in enumerate(s.points):
                tip = s.tips[i] if i < len(s.tips) else ""
                body.append(_marker(s.marker, px(x), py(y), s.marker_size, s.colour, s.opacity,
                                    tip))
    return _svg(width, height, body, title or "chart")


# ---- bars ----------------------------------------------------------------------------------------

def bar_chart(rows: Sequence[tuple[str, float | None, str]], *, title: str, width: float = 400,
              value_format: Callable[[float], str] = lambda v: f"{v:g}",
              bar_height: float = 18) -> str:
    """Horizontal bars, one per (label, value, colour); negative values grow left of zero."""
    label_w = max([_text_width(label) for label, _, _ in rows] + [40]) + 12
    values = [v for _, v, _ in rows if v is not None]
    lo, hi = min([0.0, *values]), max([0.0, *values])
    span = (hi - lo) or 1.0
    left, right, top = label_w, 58, 30
    plot_w = width - left - right
    height = top + len(rows) * (bar_height + 8) + 6
    zero = left + plot_w * (0 - lo) / span
    body = [_t(0, 16, title, size=12, weight="600")]
    for i, (label, value, colour) in enumerate(rows):
        y = top + i * (bar_height + 8)
        body.append(_t(label_w - 8, y + bar_height * 0.7, label, anchor="end"))
        if value is None:
            body.append(_t(zero + 4, y + bar_height * 0.7, "n/a", size=10, fill=MUTED))
            continue
        x1 = left + plot_w * (value - lo) / span
        x, w = min(zero, x1), max(1.0, abs(x1 - zero))
        body.append(f"<rect x='{x:.1f}' y='{y}' width='{w:.1f}' height='{bar_height}' rx='3' "
                    f"fill='{colour}'><title>{escape(label)}: {escape(value_format(value))}"
                    f"</title></rect>")
        tx = max(zero, x1) + 4
        body.append(_t(tx, y + bar_height * 0.7, value_format(value), size=10, fill=MUTED))
    body.append(f"<line x1='{zero:.1f}' y1='{top - 4}' x2='{zero:.1f}' y2='{height - 4}' "
                f"stroke='{MUTED}'/>")
    return _svg(width, height, body, title)


# ---- the system graph: tasks x components --------------------------------------------------------

def short_component_name(name: str) -> str:
    """``encoderblock_3`` -> ``block 3`` (each kind's registered label; unknown names unchanged)."""
    return registry.short_name(name)


def sharing_grid(sharing: dict, creator_colour: Callable[[str], str],
                 creator_label: Callable[[str], str], *, max_width: float = 1200,
                 row_notes: dict[str, str] | None = None) -> str:
    """Rows = tasks, columns = components of their current models (forward order), cells filled
    with the creator's colour where the task's model uses the component; components used by two or
    more tasks are outlined and show how many tasks share them."""
    tasks, comps, matrix = sharing["tasks"], sharing["components"], sharing["matrix"]
    notes = row_notes or {}
    label_w = max([_text_width(t, 12) * 1.12 for t in tasks] + [60]) + 18  # bold labels
    note_w = max([_text_width(n, 11) for n in notes.values()] + [0]) + (16 if notes else 0)
    cell = max(10.0, min(26.0, (max_width - label_w - note_w - 10) / max(1, len(comps))))
    headers = [f"{short_component_name(c['name'])} · {creator_label(c['creator'])}" for c in comps]
    head_h = max([_text_width(h, 10) for h in headers] + [40]) * 0.87 + 14
    width = label_w + cell * len(comps) + note_w + 10 + head_h * 0.5
    height = head_h + cell * len(tasks) + 8
    body: list[str] = []
    # alternate light bands per component name, so a reader sees the network's layers as groups
    band, prev = False, None
    for j, c in enumerate(comps):
        if c["name"] != prev:
            band, prev = not band, c["name"]
        if band:
            body.append(f"<rect x='{label_w + j * cell:.1f}' y='{head_h - 4:.1f}' "
                        f"width='{cell:.1f}' height='{cell * len(tasks) + 8:.1f}' fill='#f1f5f9'/>")
    for j, text in enumerate(headers):
        x, y = label_w + (j + 0.5) * cell + 3, head_h - 8
        body.append(_t(x, y, text, size=10, fill=MUTED,
                       extra=f"transform='rotate(-60 {x:.1f} {y:.1f})'"))
    for i, task in enumerate(tasks):
        y = head_h + i * cell
        body.append(_t(label_w - 10, y + cell * 0.68, task, size=12, anchor="end", weight="600"))
        for j, c in enumerate(comps):
            x = label_w + j * cell
            if not matrix[i][j]:
                body.append(f"<rect x='{x + 2.5:.1f}' y='{y + 2.5:.1f}' width='{cell - 5:.1f}' "
                            f"height='{cell - 5:.1f}' rx='2' fill='white' stroke='{GRID}'/>")
                continue
            users = c["used_by"]
            shared = len(users) > 1
            stroke = f"stroke='{INK}' stroke-width='2'" if shared else "stroke='white'"
            tip = (f"{c['id']} ({c['name']}), created by {c['creator']}, {c['params']:,} params"
                   + (f", cloned from {c['cloned_from']}" if c.get("cloned_from") else "")
                   + f"; used by {', '.join(users)}")
            body.append(f"<rect x='{x + 1.5:.1f}' y='{y + 1.5:.1f}' width='{cell - 3:.1f}' "
                        f"height='{cell - 3:.1f}' rx='3' fill='{creator_colour(c['creator'])}' "
                        f"{stroke}><title>{escape(tip)}</title></rect>")
            if shared and cell >= 14:
                body.append(_t(x + cell / 2, y + cell * 0.68, str(len(users)), size=10,
                               fill="white", anchor="middle", weight="700",
                               extra="pointer-events='none'"))
        if task in notes:
            body.append(_t(label_w + cell * len(comps) + 12, y + cell * 0.68, notes[task],
                           size=11, fill=MUTED))
    return _svg(width, height, body, "tasks against components")


# ---- lineage -------------------------------------------------------------------------------------

def _short_model(model_id: str) -> str:
    return model_id[len("agent~"):] if model_id.startswith("agent~") else model_id


def lineage_chain(chain: Sequence[dict], task_colour: Callable[[str], str],
                  preset_colour: Callable[[str], str], *, uid: str,
                  width: float = 1200) -> str:
    """Boxes from the root (left) to the task's current model (right), wrapping into rows.

    ``chain`` is the report's lineage list (current model first). Each box is coloured by the task
    its model belongs to, so a hop through another task's model shows as a change of colour.
    """
    nodes = list(reversed(chain))
    box_w, box_h, gap, row_gap = 158.0, 54.0, 30.0, 26.0
    per_row = max(1, int((width - 10 + gap) // (box_w + gap)))
    rows = math.ceil(len(nodes) / per_row) or 1
    height = rows * box_h + (rows - 1) * row_gap + 8
    used_w = min(len(nodes), per_row) * (box_w + gap) - gap + 24
    body = [f"<defs><marker id='arr-{uid}' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' "
            f"markerHeight='7' orient='auto-start-reverse'><path d='M0,0 L10,5 L0,10 z' "
            f"fill='{MUTED}'/></marker></defs>"]

    def pos(k: int) -> tuple[float, float]:
        return 4 + (k % per_row) * (box_w + gap), 4 + (k // per_row) * (box_h + row_gap)

    for k, node in enumerate(nodes):
        x, y = pos(k)
        if k:  # connector from the previous (older) model
            px_, py_ = pos(k - 1)
            if py_ == y:
                body.append(f"<line x1='{px_ + box_w:.1f}' y1='{y + box_h / 2:.1f}' "
                            f"x2='{x - 2:.1f}' y2='{y + box_h / 2:.1f}' stroke='{MUTED}' "
                            f"stroke-width='1.5' marker-end='url(#arr-{uid})'/>")
            else:  # wrap: out of the row's last box, back between the rows, down into this one
                mid = py_ + box_h + row_gap / 2
                d = (f"M{px_ + box_w:.1f},{py_ + box_h / 2:.1f} h10 V{mid:.1f} "
                     f"H{x + box_w / 2:.1f} V{y - 2:.1f}")
                body.append(f"<path d='{d}' fill='none' stroke='{MUTED}' stroke-width='1.5' "
                            f"marker-end='url(#arr-{uid})'/>")
        if node.get("missing"):
            body.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{box_w}' height='{box_h}' rx='6' "
                        f"fill='white' stroke='{ROOT_COLOUR}' stroke-dasharray='4 3'/>")
            body.append(_t(x + 8, y + 20, _short_model(node["model_id"]), size=11, weight="600"))
            body.append(_t(x + 8, y + 38, "record missing", size=10, fill=MUTED))
            continue
        colour = ROOT_COLOUR if node["task"] == "root" else task_colour(node["task"])
        muts = ", ".join(node.get("mutations") or []) or "no mutation (retrained)"
        tip = f"{node['model_id']} ({node['task']}, preset {node['preset']}): {muts}"
        body.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{box_w}' height='{box_h}' rx='6' "
                    f"fill='{tint(colour, 0.86)}' stroke='{colour}' stroke-width='1.6'>"
                    f"<title>{escape(tip)}</title></rect>")
        body.append(_t(x + 8, y + 17, _short_model(node["model_id"]), size=11, weight="600",
                       extra="pointer-events='none'"))
        score = node.get("score")
        line2 = "root (no score)" if node["task"] == "root" else \
            ("score -" if score is None else f"score {score:.3f}")
        n_mut = len(node.get("mutations") or [])
        if node["task"] != "root":
            line2 += f" · {n_mut} mut." if n_mut else " · retrain"
        body.append(_t(x + 8, y + 32, line2, size=10, fill=INK, extra="pointer-events='none'"))
        body.append(f"<circle cx='{x + 12:.1f}' cy='{y + 44:.1f}' r='4' "
                    f"fill='{preset_colour(node['preset'])}'/>")
        body.append(_t(x + 20, y + 47.5, node["preset"], size=10, fill=MUTED,
                       extra="pointer-events='none'"))
    return _svg(max(used_w, box_w + 12), height, body, "lineage")

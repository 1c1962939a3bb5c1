"""Server-rendered SVG charts for the web page.

Rendering on the server keeps the page free of any plotting library (it must work offline, with
no CDN) and lets the charts be tested in Python. Each drawn series is one ``<polyline>`` whose
vertices are the data points, plus one ``<circle>`` per point while there are few enough to see;
``data-points`` on the ``<svg>`` and on each polyline carries the count so a test (or a curious
user) can check that every progress line made it onto the curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

WIDTH, HEIGHT = 600, 240
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 50, 14, 30, 38
# Above this many points a dot per point is clutter (and DOM weight); the line alone says it all.
MAX_DOTS = 240
# Above this many vertices a polyline gains nothing visible at 600 px; stride-decimate it.
MAX_VERTICES = 4000

Point = tuple[float, float]
# Colors as SVG presentation attributes: a chart opened on its own (or inserted into a page whose
# CSP forbids inline styles) still looks right, and the page's CSS may override them.
COLORS = {"train": "#2563eb", "eval": "#e8710a", "prev": "#9aa5b1", "util": "#15803d", "mem": "#7c3aed"}
TEXT, GRID, AXIS = "#687684", "#e3e7ec", "#9aa5b1"
SVG_OPEN = ('<svg xmlns="http://www.w3.org/2000/svg" font-family="system-ui, sans-serif" font-size="12" '
            f'fill="{TEXT}" ')


@dataclass(frozen=True)
class Series:
    key: str  # CSS class and data-series name: train, eval, prev, util, mem
    label: str
    points: Sequence[Point]
    dots: bool = True
    extra: dict[str, str] = field(default_factory=dict)


def nice_ticks(lo: float, hi: float, count: int = 5, *, steps: Sequence[float] | None = None,
               integer: bool = False) -> list[float]:
    """Round tick values covering ``[lo, hi]``: steps of 1, 2, 2.5 or 5 times a power of ten, or
    the first of ``steps`` (e.g. seconds: 1, 5, 15, 60 …) that is wide enough."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(1, count)
    if steps:
        step = next((s for s in steps if s >= raw), steps[-1] * math.ceil(raw / steps[-1]))
    else:
        mag = 10 ** math.floor(math.log10(raw))
        step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    if integer:
        step = max(1.0, math.ceil(step))  # no tick at step 2.5 of a training run
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 10))
        v += step
    return ticks


TIME_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200)


def time_ticks(lo: float, hi: float, count: int) -> list[float]:
    return nice_ticks(lo, hi, count, steps=TIME_STEPS)


def step_ticks(lo: float, hi: float, count: int) -> list[float]:
    return nice_ticks(lo, hi, count, integer=True)


def _fmt_num(v: float) -> str:
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    text = f"{v:.2f}" if a >= 1 else f"{v:.3f}"
    return text.rstrip("0").rstrip(".") or "0"


def fmt_duration(seconds: float) -> str:
    """Axis labels for elapsed time: ``45s``, ``2m30s``, ``1h05m``."""
    s = round(seconds)
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s" if s else f"{m}m"
    return f"{s}s"


def _decimate(points: Sequence[Point]) -> Sequence[Point]:
    if len(points) <= MAX_VERTICES:
        return points
    stride = math.ceil(len(points) / MAX_VERTICES)
    kept = list(points[::stride])
    if kept[-1] != points[-1]:
        kept.append(points[-1])  # the latest value is the one people look for
    return kept


def _message_svg(chart_id: str, title: str, message: str, css: str = "empty") -> str:
    return (
        f'{SVG_OPEN}class="chart {css}" id="{chart_id}" data-points="0" '
        f'viewBox="0 0 {WIDTH} 120" role="img" aria-label="{escape(title)}: {escape(message)}">'
        f'<text class="title" x="{PAD_LEFT}" y="20">{escape(title)}</text>'
        f'<text class="message" x="{WIDTH / 2}" y="66" text-anchor="middle" font-size="15">{escape(message)}</text>'
        "</svg>"
    )


def line_chart(
    chart_id: str,
    title: str,
    series: Sequence[Series],
    *,
    x_label: str,
    x_fmt: Callable[[float], str] = _fmt_num,
    x_ticks: Callable[[float, float, int], list[float]] = nice_ticks,
    y_fmt: Callable[[float], str] = _fmt_num,
    x_range: tuple[float, float] | None = None,
    y_range: tuple[float, float] | None = None,
    empty: str = "no data yet",
    counted: str | None = None,
) -> str:
    """One SVG line chart. ``counted`` names the series whose length goes into ``data-points``."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return _message_svg(chart_id, title, empty)
    xs = [p[0] for s in drawn for p in s.points]
    ys = [p[1] for s in drawn for p in s.points]
    x0, x1 = x_range or (min(xs), max(xs))
    if x1 <= x0:
        x1 = x0 + 1
    if y_range is not None:
        y0, y1 = y_range
    else:
        y0, y1 = min(ys), max(ys)
        pad = (y1 - y0) * 0.08 or abs(y1) * 0.1 or 1.0
        y0, y1 = y0 - pad, y1 + pad
        if min(ys) >= 0 > y0:
            y0 = 0.0  # losses are non-negative: don't draw a negative axis
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM

    def sx(x: float) -> float:
        return PAD_LEFT + (x - x0) / (x1 - x0) * plot_w

    def sy(y: float) -> float:
        return PAD_TOP + (1 - (y - y0) / (y1 - y0)) * plot_h

    count = len(next((s.points for s in series if s.key == counted), drawn[0].points))
    out = [
        f'{SVG_OPEN}class="chart" id="{chart_id}" data-points="{count}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(title)}">',
        f'<text class="title" x="{PAD_LEFT}" y="18">{escape(title)}</text>',
    ]
    # Legend, right-aligned on the title line.
    lx = float(WIDTH - PAD_RIGHT)
    for s in reversed(drawn):
        label = escape(s.label)
        out.append(f'<text class="legend" x="{lx:.1f}" y="18" text-anchor="end">{label}</text>')
        lx -= 6.4 * len(s.label) + 6  # about a 12 px sans glyph: no text metrics on a server
        dash = ' stroke-dasharray="5 3"' if s.key == "eval" else ""
        out.append(f'<line class="swatch {s.key}" x1="{lx - 18:.1f}" y1="14" x2="{lx:.1f}" y2="14" '
                   f'stroke="{COLORS[s.key]}" stroke-width="3"{dash}/>')
        lx -= 32
    # Grid and axes.
    out.append('<g class="grid">')
    for t in nice_ticks(y0, y1, 4):
        if y0 <= t <= y1:
            y = sy(t)
            out.append(f'<line x1="{PAD_LEFT}" y1="{y:.1f}" x2="{WIDTH - PAD_RIGHT}" y2="{y:.1f}" stroke="{GRID}"/>')
            out.append(f'<text class="tick" x="{PAD_LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{y_fmt(t)}</text>')
    for t in x_ticks(x0, x1, 6):
        if x0 <= t <= x1:
            x = sx(t)
            out.append(f'<line class="xt" x1="{x:.1f}" y1="{HEIGHT - PAD_BOTTOM}" x2="{x:.1f}" '
                       f'y2="{HEIGHT - PAD_BOTTOM + 4}" stroke="{AXIS}"/>')
            out.append(f'<text class="tick" x="{x:.1f}" y="{HEIGHT - PAD_BOTTOM + 17}" '
                       f'text-anchor="middle">{x_fmt(t)}</text>')
    out.append(f'<line class="axis" x1="{PAD_LEFT}" y1="{HEIGHT - PAD_BOTTOM}" x2="{WIDTH - PAD_RIGHT}" '
               f'y2="{HEIGHT - PAD_BOTTOM}" stroke="{AXIS}"/>')
    out.append(f'<text class="axis-label" x="{PAD_LEFT + plot_w / 2}" y="{HEIGHT - 4}" '
               f'text-anchor="middle">{escape(x_label)}</text>')
    out.append("</g>")
    for s in drawn:
        verts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in _decimate(s.points))
        attrs = "".join(f' data-{k}="{escape(v)}"' for k, v in s.extra.items())
        color = COLORS[s.key]
        look = {"prev": ' stroke-width="2" opacity="0.45"', "eval": ' stroke-width="2" stroke-dasharray="5 3"'}
        out.append(f'<g class="series {s.key}" data-series="{s.key}" fill="{color}">')
        stroke = look.get(s.key, ' stroke-width="2"')
        out.append(f'<polyline class="{s.key}" data-points="{len(s.points)}"{attrs} fill="none" stroke="{color}"'
                   f'{stroke} stroke-linejoin="round" points="{verts}"/>')
        if s.dots and len(s.points) <= MAX_DOTS:
            for x, y in s.points:
                out.append(f'<circle class="{s.key}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6">'
                           f"<title>{x_fmt(x)}: {y_fmt(y)}</title></circle>")
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _get(p: Any, key: str) -> Any:
    return p.get(key) if isinstance(p, dict) else getattr(p, key, None)


def loss_points(points: Sequence[Any]) -> tuple[list[Point], list[Point]]:
    """(train, eval) as (step, loss). A line without a step sits at the previous one's step."""
    train: list[Point] = []
    evals: list[Point] = []
    last_step = 0.0
    for p in points:
        step = _get(p, "step")
        if step is not None:
            last_step = float(step)
        if _get(p, "loss") is not None:
            train.append((last_step, float(_get(p, "loss"))))
        if _get(p, "eval_loss") is not None:
            evals.append((last_step, float(_get(p, "eval_loss"))))
    return train, evals


def loss_svg(points: Sequence[Any], previous: Sequence[Any] = (), *, previous_id: str | None = None) -> str:
    """Train loss per step, eval loss if any, and the previous run's train loss faint behind."""
    train, evals = loss_points(points)
    prev, _ = loss_points(previous)
    total = max((_get(p, "total_steps") or 0 for p in points), default=0)
    if not train and not evals:
        return _message_svg("loss-chart", "loss", "no loss reported yet")
    x_hi = max([float(total)] + [p[0] for p in train + evals + prev])
    series = [
        Series("prev", "previous run", prev, dots=False, extra={"run": previous_id or ""}),
        Series("train", "train loss", train),
        Series("eval", "eval loss", evals),
    ]
    return line_chart("loss-chart", "loss", series, x_label="step", x_range=(0.0, x_hi), x_ticks=step_ticks,
                      counted="train")


def gpu_svg(points: Sequence[Any]) -> str:
    """GPU utilization and memory (both in % so one axis fits) over the run's time."""
    with_gpu = [p for p in points if _get(p, "gpu_util") is not None or _get(p, "gpu_mem_used") is not None]
    if not with_gpu:
        msg = "no GPU" + (" (progress lines carry no GPU fields)" if points else "")
        return _message_svg("gpu-chart", "GPU", msg, css="empty nogpu")
    t0 = next((float(t) for p in points if (t := _get(p, "time")) is not None), None)
    util: list[Point] = []
    mem: list[Point] = []
    for i, p in enumerate(with_gpu):
        t = _get(p, "time")
        x = float(t) - t0 if t is not None and t0 is not None else float(i)
        if _get(p, "gpu_util") is not None:
            util.append((x, float(_get(p, "gpu_util"))))
        used, total = _get(p, "gpu_mem_used"), _get(p, "gpu_mem_total")
        if used is not None and total:
            mem.append((x, 100.0 * float(used) / float(total)))
    last = with_gpu[-1]
    used, total = _get(last, "gpu_mem_used"), _get(last, "gpu_mem_total")
    mem_label = "memory"
    if used is not None and total:
        mem_label = f"memory {fmt_mib(float(used))} / {fmt_mib(float(total))}"
    series = [Series("util", "utilization", util), Series("mem", mem_label, mem)]
    return line_chart("gpu-chart", "GPU", series, x_label="time since first progress line",
                      x_fmt=fmt_duration, x_ticks=time_ticks, y_fmt=lambda v: f"{v:.0f}%",
                      y_range=(0.0, 100.0), counted="util")


def fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"

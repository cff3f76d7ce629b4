"""The storm report's three plots, as SVG drawn with the standard library.

Each plot has its legend in a row between its title and its axes, so that no legend covers
the data or the marks drawn on it. Numbers on an axis and on the marks use one format:
thousands separators, and as many decimals as the tick step needs.
"""

from __future__ import annotations

import html
import math
from typing import Any

__all__ = ["esc", "latency_plot", "num", "number", "restored_plot", "rss_plot"]

_BINS = 30
"""Linear histogram bins between 0 and the p99; samples above it go in one overflow bar."""

_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 760, 350, 76, 24, 62, 58
"""SVG size and margins around the axes, in pixels; the legend row sits in the top margin."""

_CHAR = 6.6
"""Roughly the width of a character of 12 px text, in pixels, to lay out legends."""

_BLUE, _ORANGE, _GREY, _RED, _GREEN = "#1f5fa8", "#d9730d", "#555", "#b3261e", "#2e7d32"

_STORM = {"drop": "connections dropped", "kill": "SIGKILL", "drain": "SIGTERM (drain)"}
"""How the RSS plot labels the moment the storm struck, per mode."""


def esc(value: object) -> str:
    """Return a value as text that is safe inside HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def num(value: object) -> float | None:
    """Return a finite number as a float, or None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def number(value: float) -> str:
    """Return a figure for a label: thousands separators, at most three significant digits
    below 100 and whole numbers from 100 up (2,065, 140, 20.4, 0.721)."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _pairs(series: object) -> list[tuple[float, float]]:
    """Return the numeric (x, y) pairs of a time series sorted by x, skipping malformed ones."""
    points = []
    for item in series if isinstance(series, list) else []:
        if isinstance(item, list | tuple) and len(item) == 2:
            x, y = num(item[0]), num(item[1])
            if x is not None and y is not None:
                points.append((x, y))
    return sorted(points)


def _ticks(lo: float, hi: float) -> tuple[list[float], int]:
    """Return about six round tick values from lo to hi, and the decimals their labels need."""
    raw = (hi - lo) / 6 or 1.0
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * 0.999)
    first = math.ceil(lo / step - 1e-9)
    ticks = [i * step for i in range(first, int(math.floor(hi / step + 1e-9)) + 1)]
    return ticks, max(0, -math.floor(math.log10(step)))


class _Frame:
    """Maps data coordinates to SVG pixels inside a plot's axes."""

    def __init__(self, x_lo: float, x_hi: float, y_hi: float) -> None:
        """Keep the ranges, widening empty ones (one point, all zero) to avoid dividing by 0."""
        self.x_lo, self.x_hi = x_lo, x_hi if x_hi > x_lo else x_lo + 1.0
        self.y_hi = y_hi if y_hi > 0 else 1.0

    def x(self, value: float) -> float:
        """Return the pixel column of an x value."""
        return _LEFT + (value - self.x_lo) / (self.x_hi - self.x_lo) * (_W - _LEFT - _RIGHT)

    def y(self, value: float) -> float:
        """Return the pixel row of a y value."""
        return _H - _BOTTOM - value / self.y_hi * (_H - _TOP - _BOTTOM)


def _text(x: float, y: float, text: str, extra: str = "") -> str:
    """Return an SVG text element with escaped content."""
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="12" {extra}>{esc(text)}</text>'


def _halo(x: float, y: float, text: str, extra: str = "") -> str:
    """Return text with a white outline, readable over grid lines, bars and other lines."""
    halo = 'stroke="#fff" stroke-width="4" paint-order="stroke" ' + extra
    return _text(x, y, text, halo)


def _line(x1: float, y1: float, x2: float, y2: float, colour: str, dash: str | None = None) -> str:
    """Return a thin grid line, or a thick one (dashed if dash is an SVG dash pattern)."""
    style = f'stroke="{colour}"'
    if dash is not None:
        style += ' stroke-width="2"' + (f' stroke-dasharray="{dash}"' if dash else "")
    return f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" {style}/>'


def _bar(frame: _Frame, x0: float, x1: float, height: float, colour: str) -> str:
    """Return an SVG bar standing on the x axis between two pixel columns."""
    top = frame.y(height)
    size = f'width="{x1 - x0:.1f}" height="{frame.y(0) - top:.1f}"'
    return f'<rect x="{x0:.1f}" y="{top:.1f}" {size} fill="{colour}"/>'


def _axes(
    frame: _Frame,
    x_label: str,
    y_label: str,
    *,
    x_hi: float | None = None,
    keep_clear: float | None = None,
) -> list[str]:
    """Return grid lines, tick labels, axis lines and axis labels for a frame.

    Args:
        x_hi: the last x value to put a tick at (default: the frame's end).
        keep_clear: a pixel column where another label stands under the x axis; ticks
            whose labels would run into it get no label.
    """
    bottom, right = _H - _BOTTOM, _W - _RIGHT
    out = []
    x_ticks, x_dec = _ticks(frame.x_lo, frame.x_hi if x_hi is None else x_hi)
    for t in x_ticks:
        px = frame.x(t)
        out.append(_line(px, _TOP, px, bottom, "#eee"))
        if keep_clear is None or abs(px - keep_clear) > 56:
            out.append(_text(px, bottom + 16, f"{t:,.{x_dec}f}", 'text-anchor="middle"'))
    y_ticks, y_dec = _ticks(0.0, frame.y_hi)
    for t in y_ticks:
        py = frame.y(t)
        out.append(_line(_LEFT, py, right, py, "#eee"))
        out.append(_text(_LEFT - 6, py + 4, f"{t:,.{y_dec}f}", 'text-anchor="end"'))
    out.append(f'<path d="M{_LEFT} {_TOP}V{bottom}H{right}" fill="none" stroke="#222"/>')
    out.append(_text((_LEFT + right) / 2, _H - 14, x_label, 'text-anchor="middle"'))
    mid = (_TOP + bottom) / 2
    out.append(_text(18, mid, y_label, f'text-anchor="middle" transform="rotate(-90 18 {mid})"'))
    return out


def _legend(entries: list[tuple[str, str, str]]) -> list[str]:
    """Return a legend in one row above the axes; entries are (dash or "box", colour, label)."""
    out, x, y = [], float(_LEFT), _TOP - 18
    for kind, colour, label in entries:
        if kind == "box":
            out.append(f'<rect x="{x:.1f}" y="{y - 9}" width="18" height="10" fill="{colour}"/>')
        else:
            out.append(_line(x, y - 4, x + 18, y - 4, colour, kind))
        out.append(_text(x + 24, y, label))
        x += 24 + len(label) * _CHAR + 20
    return out


def _svg(title: str, parts: list[str], caption: str) -> str:
    """Wrap plot parts in a titled SVG inside a figure with a caption."""
    head = f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">'
    head += f"<title>{esc(title)}</title>"
    head += _text(_W / 2, 20, title, 'text-anchor="middle" font-size="15" font-weight="600"')
    body = head + "".join(parts) + "</svg>"
    return f"<figure>{body}<figcaption>{esc(caption)}</figcaption></figure>"


def _missing(title: str, what: str) -> str:
    """Return the placeholder shown instead of a plot whose data the result lacks."""
    return f'<h3>{esc(title)}</h3><p class="missing">No {esc(what)} in this result.</p>'


def _marks(frame: _Frame, marks: list[tuple[float, str]], colour: str, dash: str) -> list[str]:
    """Return a labelled vertical line per mark, with each label near the top of the axes.

    A label stands right of its line, or left of it where it would cross another mark's
    line or run out of the axes; labels that would overlap go one row lower (16 px).
    """
    lines = [frame.x(value) for value, _ in marks]
    out: list[str] = []
    rows: list[list[tuple[float, float]]] = []  # per row, the extents of its labels, in px
    for value, label in sorted(marks):
        px, width = frame.x(value), len(label) * _CHAR
        right, left = (px + 1, px + 9 + width), (px - 9 - width, px - 1)
        fits = right[1] <= _W - _RIGHT
        crosses = any(right[0] < x < right[1] for x in lines)
        extent, anchor = (right, "") if fits and not crosses else (left, 'text-anchor="end"')
        if extent[0] < _LEFT:  # no room on the left either: cross a line rather than the axis
            extent, anchor = right, ""
        row = next(
            (
                i
                for i, placed in enumerate(rows)
                if all(extent[0] > b or extent[1] < a for a, b in placed)
            ),
            len(rows),
        )
        if row == len(rows):
            rows.append([])
        rows[row].append(extent)
        out.append(_line(px, _TOP, px, frame.y(0), colour, dash))
        out.append(_halo(px + (-5 if anchor else 5), _TOP + 16 + 16 * row, label, anchor))
    return out


def _percentiles(latency: dict[str, Any], samples: list[float]) -> dict[str, float]:
    """Return p50, p95 and p99 as reported, each missing one computed from the samples."""
    ordered, quantiles = sorted(samples), {"p50": 0.50, "p95": 0.95, "p99": 0.99}
    ranks = {k: min(len(ordered), math.ceil(q * len(ordered))) - 1 for k, q in quantiles.items()}
    return {k: num(latency.get(k)) or ordered[rank] for k, rank in ranks.items()}


def _bins(samples: list[float], edge: float) -> tuple[list[int], list[float]]:
    """Return the counts in equal bins from 0 to edge, and the samples above edge."""
    counts, width = [0] * _BINS, edge / _BINS
    for v in samples:
        if v <= edge:
            counts[min(_BINS - 1, max(0, int(v / width)))] += 1
    return counts, [v for v in samples if v > edge]


def latency_plot(
    latency: dict[str, Any],
    *,
    note: str = "",
    title: str = "Restore latency",
    axis: str = "restore latency (ms)",
) -> str:
    """Return a latency histogram: linear bins up to the p99, one overflow bar.

    Args:
        latency: ``samples`` in ms, and the percentiles if already known (the storm's
            ``restore_latency_ms`` group).
        note: a sentence added to the caption (what the latencies include).
        title: the plot's title; axis: its x axis label.
    """
    raw = latency.get("samples")
    samples = [v for v in map(num, raw if isinstance(raw, list) else []) if v is not None]
    if not samples:
        return _missing(title, "restore latency samples")
    marks = _percentiles(latency, samples)
    edge = marks["p99"] if marks["p99"] > 0 else max(max(samples), 1.0)
    (counts, over), width = _bins(samples, edge), edge / _BINS
    frame = _Frame(0.0, edge + (5 * width if over else 0.0), max(counts + [len(over)]) * 1.25)
    x0, x1 = frame.x(edge + 2.5 * width), frame.x(edge + 4.5 * width)
    parts = _axes(
        frame,
        axis,
        "samples (count)",
        x_hi=edge,
        keep_clear=(x0 + x1) / 2 if over else None,
    )
    for i, n in enumerate(counts):
        parts.append(
            _bar(frame, frame.x(i * width) + 0.5, frame.x((i + 1) * width) - 0.5, n, _BLUE)
        )
    legend = [("box", _BLUE, f"samples per {number(width)} ms bin")]
    if over:
        parts.append(_bar(frame, x0, x1, len(over), _ORANGE))
        _, decimals = _ticks(0.0, edge)
        tick = f"> {edge:,.{decimals}f}"
        parts.append(_text((x0 + x1) / 2, frame.y(0) + 16, tick, 'text-anchor="middle"'))
        legend.append(("box", _ORANGE, f"above p99, up to {number(max(over))} ms"))
    shown = [(v, f"{k} {number(v)} ms") for k, v in marks.items() if v <= edge]
    parts += _marks(frame, shown, _RED, "5 3")
    legend.append(("5 3", _RED, "percentiles"))
    caption = (
        f"{len(samples):,} samples in {_BINS} bins from 0 to the p99 ({number(edge)} ms); "
        f"{len(over):,} above it, in the orange bar (off the x scale). Percentiles as the "
        f"tool reported them, or else computed from the samples (nearest rank). {note}"
    )
    return _svg(title, parts + _legend(legend), caption.strip())


def restored_plot(result: dict[str, Any]) -> str:
    """Return sessions restored so far against time since the storm began, as a step line,
    with the moment all were restored and (kill, drain) the moment the gateway listened again."""
    title = "Sessions restored during the storm"
    points = _pairs(result.get("restored_over_time"))
    if not points:
        return _missing(title, "restored-over-time series")
    params, storm = result.get("params", {}), result.get("storm")
    storm = storm if isinstance(storm, dict) else {}
    total = num(params.get("sessions")) if isinstance(params, dict) else None
    done, restart = num(storm.get("all_restored_s")), num(storm.get("gateway_restart_s"))
    last = max([p[0] for p in points] + [done or 0.0])
    y_hi = max([p[1] for p in points] + [total or 0.0]) * 1.1
    frame = _Frame(min(0.0, points[0][0]), last * 1.08, y_hi)
    parts = _axes(frame, "time since the storm began (s)", "sessions restored (count)")
    legend = [("", _BLUE, "restored so far")]
    if total is not None:
        py = frame.y(total)
        parts.append(_line(_LEFT, py, _W - _RIGHT, py, _GREY, "6 4"))
        legend.append(("6 4", _GREY, f"all {total:,.0f} sessions"))
    if restart is not None:
        parts += _marks(frame, [(restart, f"listening again, {number(restart)} s")], _GREY, "2 3")
        legend.append(("2 3", _GREY, "gateway restarted"))
    path = f"M{frame.x(points[0][0]):.1f} {frame.y(points[0][1]):.1f}"
    path += "".join(f"H{frame.x(x):.1f}V{frame.y(y):.1f}" for x, y in points[1:])
    parts.append(f'<path d="{path}" fill="none" stroke="{_BLUE}" stroke-width="2"/>')
    if done is not None:
        px, label = frame.x(done), f"all restored, {number(done)} s"
        parts.append(_line(px, _TOP, px, frame.y(0), _GREEN, ""))
        if total is not None:
            parts.append(f'<circle cx="{px:.1f}" cy="{frame.y(total):.1f}" r="5" fill="{_GREEN}"/>')
        # Bottom right: late in the storm most sessions are back, so the line is high there.
        bold = 'text-anchor="end" font-weight="600"'
        parts.append(_halo(px - 8, frame.y(0) - 10, label, bold))
        legend.append(("", _GREEN, "all restored"))
    caption = f"{len(points):,} points; the line steps at each sample."
    return _svg(title, parts + _legend(legend), caption)


def rss_plot(result: dict[str, Any]) -> str:
    """Return the gateway's resident memory against time since the run began, with the
    start of the connects, the storm (the kill, the drain's SIGTERM or the drop), the
    restart and the moment all were restored marked."""
    title = "Gateway resident memory (RSS)"
    gateway, params = result.get("gateway"), result.get("params")
    gateway = gateway if isinstance(gateway, dict) else {}
    mode = params.get("mode") if isinstance(params, dict) else None
    points = _pairs(gateway.get("rss_over_time"))
    if not points:
        return _missing(title, "gateway RSS series")
    raw = gateway.get("events_s")
    events = {k: v for k, v in (raw.items() if isinstance(raw, dict) else []) if num(v) is not None}
    names = {
        "connect": "sessions connect",
        "storm": _STORM.get(str(mode), "storm"),
        "stopped": "drained, exited" if mode == "drain" else "",
        "restarted": "listening again",
        "all_restored": "all restored",
    }
    marks = [(float(events[k]), name) for k, name in names.items() if name and k in events]
    x_hi = max([points[-1][0]] + [m[0] for m in marks])
    # Headroom above the line for the marks' labels.
    frame = _Frame(min(0.0, points[0][0]), x_hi, max(p[1] for p in points) * 1.3)
    parts = _axes(frame, "time since the run began (s)", "gateway RSS (MiB)")
    parts += _marks(frame, marks, _GREY, "2 3")
    # The restarted gateway is another process: its line starts afresh. Results from before
    # "stopped" was recorded: a SIGKILLed process is gone at once.
    split = events.get("stopped", events.get("storm") if mode == "kill" else None)
    segments = [[p for p in points if split is None or p[0] < split]]
    segments.append([p for p in points if split is not None and p[0] >= split])
    for segment in filter(None, segments):
        path = "L".join(f"{frame.x(x):.1f} {frame.y(y):.1f}" for x, y in segment)
        parts.append(f'<path d="M{path}" fill="none" stroke="{_BLUE}" stroke-width="2"/>')
    legend = [("", _BLUE, "gateway RSS")]
    if marks:
        legend.append(("2 3", _GREY, "events of the run"))
    caption = f"{len(points):,} samples; the y axis starts at 0 MiB."
    if split is not None:
        caption += " The line breaks where the first process exited and the second began."
    return _svg(title, parts + _legend(legend), caption)

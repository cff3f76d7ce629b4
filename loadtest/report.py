"""Render a reconnect storm's JSON result as one self-contained HTML page.

The page runs no script and loads nothing: the style is inline and the three plots are SVG
drawn here with the standard library. Every string taken from the result is escaped, since
session names and problems come from the network. Keys other than ``params`` and ``ok`` may
be missing; what is missing is left out or replaced by a note.

    python -m loadtest.report result.json -o report.html
"""

from __future__ import annotations

import argparse
import html
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["MAX_VIOLATIONS", "main", "render_html", "write_report"]

MAX_VIOLATIONS = 50
"""Violations listed in the table; the banner gives the full count."""

_BINS = 30
"""Linear histogram bins between 0 and the p99; samples above it go in one overflow bar."""

_W, _H, _LEFT, _RIGHT, _TOP, _BOTTOM = 760, 330, 76, 24, 44, 58
"""SVG size and margins around the axes, in pixels."""

_BLUE, _ORANGE, _GREY, _RED = "#1f5fa8", "#d9730d", "#555", "#b3261e"

_MACHINE = (("cpus", "CPUs:"), ("platform", "platform:"), ("python", "Python"))
_PLOTTED = {"samples", "restored_over_time", "rss_over_time", "violations"}

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}.meta{color:#444}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;font-size:17px;margin:12px 0}
.fail{background:#fde7e6;color:#8c1d18;border:2px solid #b3261e}
.pass{background:#e6f4ea;color:#1e5e2e;border:1px solid #2e7d32}
table{border-collapse:collapse;margin:0 0 8px}td.n{text-align:right}
td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}
.violations th{background:#fde7e6}.scroll{max-height:320px;overflow:auto;display:inline-block}
.groups{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
caption{text-align:left;font-weight:600}
figure{margin:16px 0}figcaption{color:#444;font-size:13px;max-width:760px}
.missing{color:#7a4a00;font-style:italic}svg text{font-family:system-ui,sans-serif}
"""


def _esc(value: object) -> str:
    """Return a value as text that is safe inside HTML content and attribute values."""
    return html.escape(str(value), quote=True)


def _num(value: object) -> float | None:
    """Return a finite number as a float, or None for anything else (booleans included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _fmt(value: object) -> str:
    """Format a scalar for a table cell: integers with separators, floats to a few digits."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.3g}"
    return str(value)


def _group(result: dict[str, Any], key: str) -> dict[str, Any]:
    """Return a group of the result, or an empty dict when it is missing or not a dict."""
    value = result.get(key)
    return value if isinstance(value, dict) else {}


def _pairs(series: object) -> list[tuple[float, float]]:
    """Return the numeric (x, y) pairs of a time series sorted by x, skipping malformed ones."""
    points = []
    for item in series if isinstance(series, list) else []:
        if isinstance(item, list | tuple) and len(item) == 2:
            x, y = _num(item[0]), _num(item[1])
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
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="12" {extra}>{_esc(text)}</text>'


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


def _axes(frame: _Frame, x_label: str, y_label: str, x_hi: float | None = None) -> list[str]:
    """Return grid lines, tick labels, axis lines and axis labels for a frame."""
    bottom, right = _H - _BOTTOM, _W - _RIGHT
    out = []
    x_ticks, x_dec = _ticks(frame.x_lo, frame.x_hi if x_hi is None else x_hi)
    for t in x_ticks:
        px = frame.x(t)
        out.append(_line(px, _TOP, px, bottom, "#eee"))
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


def _legend(entries: list[tuple[str, str, str]], *, low: bool = False) -> list[str]:
    """Return a legend at the top (or bottom) right; entries are (dash or "box", colour, label)."""
    x, first = _W - _RIGHT - 290, _H - _BOTTOM - 12 - 17 * len(entries) if low else _TOP
    out = [f'<rect x="{x - 6}" y="{first + 1}" width="292" height="{17 * len(entries) + 6}" ']
    out[0] += 'fill="#fff" fill-opacity="0.85"/>'
    for i, (kind, colour, label) in enumerate(entries):
        y = first + 14 + i * 17
        if kind == "box":
            out.append(f'<rect x="{x}" y="{y - 9}" width="18" height="10" fill="{colour}"/>')
        else:
            out.append(_line(x, y - 4, x + 18, y - 4, colour, kind))
        out.append(_text(x + 24, y, label))
    return out


def _svg(title: str, parts: list[str], caption: str) -> str:
    """Wrap plot parts in a titled SVG inside a figure with a caption."""
    head = f'<svg width="{_W}" height="{_H}" viewBox="0 0 {_W} {_H}" role="img">'
    head += f"<title>{_esc(title)}</title>"
    head += _text(_W / 2, 22, title, 'text-anchor="middle" font-size="15" font-weight="600"')
    body = head + "".join(parts) + "</svg>"
    return f"<figure>{body}<figcaption>{_esc(caption)}</figcaption></figure>"


def _missing(title: str, what: str) -> str:
    """Return the placeholder shown instead of a plot whose data the result lacks."""
    return f'<h3>{_esc(title)}</h3><p class="missing">No {_esc(what)} in this result.</p>'


def _percentiles(latency: dict[str, Any], samples: list[float]) -> dict[str, float]:
    """Return p50, p95 and p99 as reported, each missing one computed from the samples."""
    ordered, quantiles = sorted(samples), {"p50": 0.50, "p95": 0.95, "p99": 0.99}
    ranks = {k: min(len(ordered), math.ceil(q * len(ordered))) - 1 for k, q in quantiles.items()}
    return {k: _num(latency.get(k)) or ordered[rank] for k, rank in ranks.items()}


def _bins(samples: list[float], edge: float) -> tuple[list[int], list[float]]:
    """Return the counts in equal bins from 0 to edge, and the samples above edge."""
    counts, width = [0] * _BINS, edge / _BINS
    for v in samples:
        if v <= edge:
            counts[min(_BINS - 1, max(0, int(v / width)))] += 1
    return counts, [v for v in samples if v > edge]


def _marks(frame: _Frame, marks: dict[str, float]) -> list[str]:
    """Return a labelled vertical dashed line per percentile, labels staggered in height."""
    out = []
    for row, (name, value) in enumerate(sorted(marks.items())):
        px = frame.x(value)
        anchor, offset = ('text-anchor="end"', -4) if px > _W / 2 else ("", 4)
        out.append(_line(px, _TOP, px, frame.y(0), _RED, "5 3"))
        out.append(_text(px + offset, _TOP + 60 + 15 * row, f"{name} {value:,.4g} ms", anchor))
    return out


def _latency_plot(latency: dict[str, Any]) -> str:
    """Return the restore latency histogram: linear bins up to the p99, one overflow bar."""
    title = "Restore latency"
    raw = latency.get("samples")
    samples = [v for v in map(_num, raw if isinstance(raw, list) else []) if v is not None]
    if not samples:
        return _missing(title, "restore latency samples")
    marks = _percentiles(latency, samples)
    edge = marks["p99"] if marks["p99"] > 0 else max(max(samples), 1.0)
    (counts, over), width = _bins(samples, edge), edge / _BINS
    frame = _Frame(0.0, edge + (4 * width if over else 0.0), max(counts + [len(over)]) * 1.15)
    parts = _axes(frame, "restore latency (ms)", "samples (count)", x_hi=edge)
    for i, n in enumerate(counts):
        parts.append(
            _bar(frame, frame.x(i * width) + 0.5, frame.x((i + 1) * width) - 0.5, n, _BLUE)
        )
    legend = [("box", _BLUE, f"samples per {width:.3g} ms bin")]
    if over:
        x0, x1 = frame.x(edge + 1.5 * width), frame.x(edge + 3.5 * width)
        parts.append(_bar(frame, x0, x1, len(over), _ORANGE))
        parts.append(_text((x0 + x1) / 2, frame.y(0) + 16, f"> {edge:.3g}", 'text-anchor="middle"'))
        legend.append(("box", _ORANGE, f"above p99, up to {max(over):,.4g} ms (off the x scale)"))
    parts += _marks(frame, {k: v for k, v in marks.items() if v <= edge})
    legend.append(("5 3", _RED, "percentiles"))
    caption = (
        f"{len(samples):,} samples in {_BINS} bins from 0 to the p99 ({edge:,.4g} ms); "
        f"{len(over):,} above it. Percentiles as the storm tool reported them, or else "
        "computed from the samples (nearest rank)."
    )
    return _svg(title, parts + _legend(legend), caption)


def _restored_plot(result: dict[str, Any]) -> str:
    """Return sessions restored so far against time since the storm began, as a step line."""
    title = "Sessions restored during the storm"
    points = _pairs(result.get("restored_over_time"))
    if not points:
        return _missing(title, "restored-over-time series")
    total = _num(result["params"].get("sessions"))
    done = _num(_group(result, "storm").get("all_restored_s"))
    x_hi = max([p[0] for p in points] + [done or 0.0])
    y_hi = max([p[1] for p in points] + [total or 0.0]) * 1.1
    frame = _Frame(min(0.0, points[0][0]), x_hi, y_hi)
    parts = _axes(frame, "time since the storm began (s)", "sessions restored (count)")
    path = f"M{frame.x(points[0][0]):.1f} {frame.y(points[0][1]):.1f}"
    path += "".join(f"H{frame.x(x):.1f}V{frame.y(y):.1f}" for x, y in points[1:])
    parts.append(f'<path d="{path}" fill="none" stroke="{_BLUE}" stroke-width="2"/>')
    legend = [("", _BLUE, "restored so far")]
    if total is not None:
        py = frame.y(total)
        parts.append(_line(_LEFT, py, _W - _RIGHT, py, _GREY, "6 4"))
        legend.append(("6 4", _GREY, f"total sessions ({total:,.0f})"))
    if done is not None:
        px = frame.x(done)
        parts.append(_line(px, _TOP, px, _H - _BOTTOM, _ORANGE, "2 3"))
        legend.append(("2 3", _ORANGE, f"all restored at {done:.3g} s"))
    caption = f"{len(points):,} points; the line steps at each sample."
    return _svg(title, parts + _legend(legend, low=True), caption)


def _rss_plot(result: dict[str, Any]) -> str:
    """Return the gateway's resident memory against time since the run began."""
    title = "Gateway resident memory (RSS)"
    points = _pairs(_group(result, "gateway").get("rss_over_time"))
    if not points:
        return _missing(title, "gateway RSS series")
    frame = _Frame(min(0.0, points[0][0]), points[-1][0], max(p[1] for p in points) * 1.1)
    parts = _axes(frame, "time since the run began (s)", "gateway RSS (MB)")
    path = "L".join(f"{frame.x(x):.1f} {frame.y(y):.1f}" for x, y in points)
    parts.append(f'<path d="M{path}" fill="none" stroke="{_BLUE}" stroke-width="2"/>')
    caption = f"{len(points):,} samples; the y axis starts at 0 MB."
    return _svg(title, parts, caption)


def _unit(group: str, key: str) -> str:
    """Return the unit a figure's group and name imply, or "" when they imply none."""
    if group == "ratios":
        return "× bare"
    if group == "restore_latency_ms":
        return "ms"
    words = key.rsplit(".", 1)[-1].split("_")
    for word, unit in (("ms", "ms"), ("us", "µs"), ("kib", "KiB"), ("mb", "MB")):
        if word in words:
            return unit
    if words[-2:] == ["per", "s"]:
        return "per s"
    return "s" if words[-1] in ("s", "seconds") else ""


def _flatten(value: dict[str, Any], prefix: str = "") -> list[tuple[str, object]]:
    """Return (dotted key, scalar) pairs of a nested dict, skipping the plotted series."""
    rows: list[tuple[str, object]] = []
    for key, item in value.items():
        if key in _PLOTTED:
            continue
        if isinstance(item, dict):
            rows += _flatten(item, f"{prefix}{key}.")
        elif isinstance(item, list):
            rows.append((f"{prefix}{key}", f"list of {len(item)}"))
        else:
            rows.append((f"{prefix}{key}", item))
    return rows


def _table(group: str, rows: list[tuple[str, object]]) -> str:
    """Return one group of figures as a small table of name, value and unit."""
    cells = "".join(
        f'<tr><td>{_esc(k)}</td><td class="n">{_esc(_fmt(v))}</td><td>{_unit(group, k)}</td></tr>'
        for k, v in rows
    )
    return f"<table><caption>{_esc(group)}</caption>{cells}</table>"


def _summary(result: dict[str, Any]) -> str:
    """Return every scalar figure of the result, one table per group, in the result's order."""
    run = [(k, v) for k, v in result.items() if not isinstance(v, dict | list)]
    groups = [k for k, v in result.items() if isinstance(v, dict)]
    tables = [_table("run", run)] + [_table(g, _flatten(result[g])) for g in groups]
    return '<h2>Figures</h2><div class="groups">' + "".join(tables) + "</div>"


def _verdict(result: dict[str, Any]) -> str:
    """Return the banner at the top: green only if ok is true and nothing was violated."""
    raw = result.get("violations")
    violations = raw if isinstance(raw, list) else []
    ok, count = result.get("ok"), len(violations)
    if not count and ok is True:
        return '<div class="banner pass">PASSED: ok = true, no violations</div>'
    if not count:
        text = _esc(f"FAILED: ok = {json.dumps(ok)}, no violation listed")
        return f'<div class="banner fail">{text}</div>'
    note = " (yet the result says ok = true)" if ok is True else ""
    banner = f'<div class="banner fail">FAILED: {count:,} violation{"s" * (count != 1)}{note}</div>'
    rows = "".join(
        f"<tr><td>{_esc(v.get('session', ''))}</td><td>{_esc(v.get('problem', ''))}</td></tr>"
        if isinstance(v, dict)
        else f"<tr><td></td><td>{_esc(v)}</td></tr>"
        for v in violations[:MAX_VIOLATIONS]
    )
    shown = f"First {MAX_VIOLATIONS} of {count:,}." if count > MAX_VIOLATIONS else "All shown."
    table = f'<table class="violations"><tr><th>session</th><th>problem</th></tr>{rows}</table>'
    return f'{banner}<p>{shown}</p><div class="scroll">{table}</div>'


def _meta(result: dict[str, Any]) -> str:
    """Return the line under the title: date, tool and version, and the machine."""
    machine = _group(result, "machine")
    described = ", ".join(f"{name} {machine[key]}" for key, name in _MACHINE if key in machine)
    tool = str(result.get("tool", "tool not recorded"))
    tool += f" v{result['version']}" if "version" in result else ""
    date = result.get("date", "date not recorded")
    return f"{date} · {tool} · {described or 'machine not recorded'}"


def render_html(result: dict[str, Any]) -> str:
    """Return the storm result as one HTML page that needs no script and loads nothing."""
    params = result["params"]
    sessions, mode = params.get("sessions", "?"), params.get("mode", "?")
    title = f"hangon reconnect storm: {sessions} sessions, mode {mode}"
    plots = [_latency_plot(_group(result, "restore_latency_ms")), _restored_plot(result)]
    plots.append(_rss_plot(result))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_esc(title)}</h1><p class="meta">{_esc(_meta(result))}</p>{_verdict(result)}'
        f"{_summary(result)}<h2>Plots</h2>{''.join(plots)}</body></html>\n"
    )


def write_report(result: dict[str, Any], path: Path) -> None:
    """Write the HTML page for a storm result to a file, in UTF-8."""
    path.write_text(render_html(result), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Read a storm result from a JSON file and write its HTML report; return the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.report",
        description="Render a reconnect storm's JSON result as one self-contained HTML page.",
    )
    parser.add_argument("result", type=Path, help="the storm tool's JSON result")
    parser.add_argument("-o", "--output", type=Path, help="HTML file (default: RESULT.html)")
    args = parser.parse_args(argv)
    result = json.loads(args.result.read_text(encoding="utf-8"))
    output = args.output or args.result.with_suffix(".html")
    write_report(result, output)
    print(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Render a reconnect storm's JSON result as one self-contained HTML page.

The page runs no script and loads nothing: the style is inline and the three plots are SVG
(:mod:`loadtest.plot`). Every string taken from the result is escaped, since
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

from loadtest.label import GROUPS, SKIPPED, label, title
from loadtest.plot import latency_plot, restored_plot, rss_plot

__all__ = ["MAX_VIOLATIONS", "main", "render_html", "write_report"]

MAX_VIOLATIONS = 50
"""Violations listed in the table; the banner gives the full count."""

_MACHINE = (("cpus", "CPUs:"), ("platform", "platform:"), ("python", "Python"))
_JOINED = {"gateway_idle": "gateway", "redis": "turns"}
"""Small groups shown in the table of another: RSS at rest with the gateway's figures,
Redis round trips per turn with the turns."""

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px}.meta{color:#444}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;font-size:17px;margin:12px 0}
.fail{background:#fde7e6;color:#8c1d18;border:2px solid #b3261e}
.pass{background:#e6f4ea;color:#1e5e2e;border:1px solid #2e7d32}
table{border-collapse:collapse;margin:0 0 8px}td.n{text-align:right;white-space:nowrap}
td.t{max-width:440px;overflow-wrap:anywhere}td:first-child{white-space:nowrap}
td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}
.violations th{background:#fde7e6}.scroll{max-height:320px;overflow:auto;display:inline-block}
.groups{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
caption{text-align:left;font-weight:600}.groups p{font-size:13px;color:#444;max-width:420px}
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


def _flatten(value: dict[str, Any], prefix: str) -> list[tuple[str, object]]:
    """Return (dotted key, scalar) pairs of a nested dict, skipping the plotted series."""
    rows: list[tuple[str, object]] = []
    for key, item in value.items():
        if key in SKIPPED:
            continue
        if isinstance(item, dict):
            rows += _flatten(item, f"{prefix}{key}.")
        elif isinstance(item, list):
            rows.append((f"{prefix}{key}", f"list of {len(item)}"))
        else:
            rows.append((f"{prefix}{key}", item))
    return rows


def _table(group: str, rows: list[tuple[str, object]], note: str = "") -> str:
    """Return one group of figures as a small table of label, value and unit."""
    cells = []
    for key, value in rows:
        name, unit = label(key)
        kind = "n" if _num(value) is not None else "t"
        cell = f'<td class="{kind}">{_esc(_fmt(value))}</td>'
        cells.append(f"<tr><td>{_esc(name)}</td>{cell}<td>{_esc(unit)}</td></tr>")
    table = f"<table><caption>{_esc(title(group))}</caption>{''.join(cells)}</table>"
    return f"<div>{table}<p>{_esc(note)}</p></div>" if note else table


def _details(result: dict[str, Any]) -> str:
    """Return every scalar figure of the result, one table per group, known groups first."""
    groups = [k for k, v in result.items() if isinstance(v, dict)]
    rows: dict[str, list[tuple[str, object]]] = {}
    for group in sorted(groups, key=lambda g: list(GROUPS).index(g) if g in GROUPS else 99):
        host = _JOINED[group] if _JOINED.get(group) in groups else group
        rows.setdefault(host, []).extend(_flatten(result[group], f"{group}."))
    run = [(k, v) for k, v in result.items() if k not in SKIPPED and not isinstance(v, dict | list)]
    tables = [_table(group, figures) for group, figures in rows.items() if figures]
    tables.append(_table("run", run))
    return '<h2>Every figure</h2><div class="groups">' + "".join(tables) + "</div>"


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
    restarts = " The latencies include the gateway's restart." if mode in ("kill", "drain") else ""
    plots = [latency_plot(_group(result, "restore_latency_ms"), note=restarts)]
    plots += [restored_plot(result), rss_plot(result)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>"
        f'<h1>{_esc(title)}</h1><p class="meta">{_esc(_meta(result))}</p>{_verdict(result)}'
        f"<h2>Plots</h2>{''.join(plots)}{_details(result)}</body></html>\n"
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

"""Render a reconnect storm's JSON result as one self-contained HTML page.

The page reads from the top: a summary first (the verdict, N and the mode, the time until
all were restored, restore p50 and p99, CPU per restore and per turn and RSS per session,
each against the bare server where that compares like with like), then the violations, the
plots (:mod:`loadtest.plot`) and every figure with a plain label and unit
(:mod:`loadtest.label`).

The page runs no script and loads nothing: the style is inline and the plots are SVG.
Every string taken from the result is escaped, since session names and problems come from
the network. Keys other than ``params`` and ``ok`` may be missing; what is missing is left
out or replaced by a note.

    python -m loadtest.report result.json -o report.html
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadtest.label import GROUPS, SKIPPED, label, title
from loadtest.plot import esc, latency_plot, num, number, restored_plot, rss_plot

__all__ = ["MAX_VIOLATIONS", "main", "render_html", "write_report"]

MAX_VIOLATIONS = 50
"""Violations listed in the table; the banner gives the full count."""

_MODES = {
    "drop": "every client connection aborted at once",
    "kill": "gateway SIGKILLed, then restarted",
    "drain": "gateway drained (SIGTERM), then restarted",
}

_RESTARTS = ("kill", "drain")
"""Modes whose restore times include the gateway's restart: no bare server compares."""

_RESTORE_TIME_RATIOS = ("restore_time_vs_bare_connect", "restore_time_vs_bare_storm")

_JOINED = {"gateway_idle": "gateway", "redis": "turns"}
"""Small groups shown in the table of another: RSS at rest with the gateway's figures,
Redis round trips per turn with the turns."""

_MACHINE = (("cpus", "CPUs:"), ("platform", "platform:"), ("python", "Python"))

_CSS = """
body{font:15px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;padding:0 16px}
h1{font-size:22px;margin:0 0 12px}h2{font-size:18px;margin:28px 0 8px}.meta{color:#444}
.banner{padding:12px 16px;border-radius:6px;font-weight:600;font-size:17px;margin:0 0 12px}
.fail{background:#fde7e6;color:#8c1d18;border:2px solid #b3261e}
.pass{background:#e6f4ea;color:#1e5e2e;border:1px solid #2e7d32}
.figures{display:grid;grid-template-columns:repeat(auto-fill,minmax(320px,1fr));gap:10px;margin:0}
.figures div{border:1px solid #ddd;border-radius:6px;padding:8px 12px}
.figures dt{color:#444;font-size:13px}.figures dd{margin:0}
.figures .v{font-size:21px;font-weight:600}.figures .note{color:#444;font-size:13px}
table{border-collapse:collapse;margin:0 0 8px}td.n{text-align:right;white-space:nowrap}
td.t{max-width:440px;overflow-wrap:anywhere}td:first-child{white-space:nowrap}
td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #ddd;vertical-align:top}
.violations th{background:#fde7e6}.scroll{max-height:320px;overflow:auto;display:inline-block}
.groups{display:flex;flex-wrap:wrap;gap:8px 32px;align-items:flex-start}
caption{text-align:left;font-weight:600}.groups p{font-size:13px;color:#444;max-width:420px}
figure{margin:16px 0}figcaption{color:#444;font-size:13px;max-width:760px}
.missing{color:#7a4a00;font-style:italic}svg text{font-family:system-ui,sans-serif}
"""


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


def _at(result: dict[str, Any], *keys: str) -> float | None:
    """Return the number at a path of keys, or None when any step is missing."""
    value: object = result
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return num(value)


def _against(hangon: float | None, bare: float | None, unit: str, what: str) -> str:
    """Return "3.11× WHAT (0.45 UNIT)", or a note that no bare figure compares."""
    if hangon is None:
        return ""
    if bare is None or bare <= 0:
        return "no bare server in this run (--baseline)"
    return f"{hangon / bare:.2f}× {what} ({number(bare)} {unit})"


def _figure(name: str, value: str, note: str = "") -> str:
    """Return one figure of the summary: its name, its value with unit, and a note."""
    extra = f'<dd class="note">{esc(note)}</dd>' if note else ""
    return f'<div><dt>{esc(name)}</dt><dd class="v">{esc(value)}</dd>{extra}</div>'


def _summary(result: dict[str, Any]) -> str:
    """Return the summary at the top: the verdict, then the figures a reader looks for."""
    params = _group(result, "params")
    mode, sessions = str(params.get("mode", "?")), num(params.get("sessions"))
    base = _group(result, "baseline")
    latency = _group(result, "restore_latency_ms")
    restart = _at(result, "storm", "gateway_restart_s")
    turns = num(params.get("turns"))
    count = f"{sessions:,.0f}" if sessions is not None else "?"
    each = f"; {turns:,.0f} turns each before it" if turns is not None else ""
    figures = [_figure("Sessions and mode", f"{count} · {mode}", _MODES.get(mode, "") + each)]
    restored = _at(result, "storm", "all_restored_s")
    bare_storm = _at(base, "connect", "drop_storm", "seconds")
    if mode in _RESTARTS:
        took = f" ({number(restart)} s)" if restart is not None else ""
        note = f"includes the gateway's restart{took}, so not compared with a bare server"
    elif bare_storm is not None:
        note = _against(restored, bare_storm, "s", "a bare server's same drop storm")
    else:
        note = _against(restored, _at(base, "connect", "seconds"), "s", "a bare server's connect")
    shown = f"{number(restored)} s" if restored is not None else "not measured"
    figures.append(_figure("Time until all were restored", shown, note))
    p50, p99 = num(latency.get("p50")), num(latency.get("p99"))
    if p50 is not None and p99 is not None:
        note = "from each client's loss of its connection to its welcome"
        note += "; includes the restart" if mode in _RESTARTS else ""
        figures.append(
            _figure("Restore latency p50 / p99", f"{number(p50)} / {number(p99)} ms", note)
        )
    else:
        figures.append(_figure("Restore latency p50 / p99", "not measured"))
    figures += _costs(result, mode, base)
    return (
        '<section class="summary">'
        + _verdict(result)
        + '<dl class="figures">'
        + "".join(figures)
        + "</dl></section>"
    )


def _costs(result: dict[str, Any], mode: str, base: dict[str, Any]) -> list[str]:
    """Return the summary's CPU and memory figures, each against its like on the bare server.

    In a drop storm the gateway also tears down the connection each restore replaces, as
    the bare server's drop storm does; after a kill or a drain the restores reach a new
    process with nothing to tear down, like the bare server's first connects.
    """
    out = []
    cpu = _at(result, "gateway", "cpu_ms_per_restore")
    storm_cpu = _at(base, "connect", "drop_storm", "server_cpu_ms_per_reconnect")
    if mode == "drop" and storm_cpu is not None:
        note = _against(cpu, storm_cpu, "ms", "a bare server's reconnect in a drop storm")
    else:
        bare = _at(base, "connect", "server_cpu_ms_per_connection")
        note = _against(cpu, bare, "ms", "a bare server's new connection")
    out.append(_figure("Gateway CPU per restore", _with(cpu, "ms"), note))
    cpu = _at(result, "turns", "gateway_cpu_us_per_turn")
    bare = _at(base, "echo", "server_cpu_us_per_message")
    note = _against(cpu, bare, "µs", "a bare server's echoed message")
    out.append(_figure("Gateway CPU per turn", _with(cpu, "µs"), note))
    rss = _at(result, "gateway_idle", "rss_kib_per_session")
    bare = _at(base, "connect", "server_rss_kib_per_connection")
    note = _against(rss, bare, "KiB", "a bare server's idle connection")
    out.append(_figure("Gateway RSS per idle session", _with(rss, "KiB"), note))
    return out


def _with(value: float | None, unit: str) -> str:
    """Return a value with its unit, or "not measured"."""
    return "not measured" if value is None else f"{number(value)} {unit}"


def _verdict(result: dict[str, Any]) -> str:
    """Return the verdict banner: green only if ok is true and nothing was violated."""
    raw = result.get("violations")
    violations = raw if isinstance(raw, list) else []
    ok, count = result.get("ok"), len(violations)
    if not count and ok is True:
        verified, sessions = num(result.get("verified")), _group(result, "params").get("sessions")
        text = "ok = true"
        if verified is not None and isinstance(sessions, int):
            text = f"{verified:,.0f} of {sessions:,} sessions restored whole and verified"
        return f'<div class="banner pass">PASSED: {esc(text)}, no violations</div>'
    if not count:
        text = esc(f"FAILED: ok = {json.dumps(ok)}, no violation listed")
        return f'<div class="banner fail">{text}</div>'
    note = " (yet the result says ok = true)" if ok is True else ""
    return f'<div class="banner fail">FAILED: {count:,} violation{"s" * (count != 1)}{note}</div>'


def _violations(result: dict[str, Any]) -> str:
    """Return the table of the first violations, or nothing when there are none."""
    raw = result.get("violations")
    violations = raw if isinstance(raw, list) else []
    if not violations:
        return ""
    count = len(violations)
    rows = "".join(
        f"<tr><td>{esc(v.get('session', ''))}</td><td>{esc(v.get('problem', ''))}</td></tr>"
        if isinstance(v, dict)
        else f"<tr><td></td><td>{esc(v)}</td></tr>"
        for v in violations[:MAX_VIOLATIONS]
    )
    shown = f"First {MAX_VIOLATIONS} of {count:,}." if count > MAX_VIOLATIONS else "All shown."
    table = f'<table class="violations"><tr><th>session</th><th>problem</th></tr>{rows}</table>'
    return f'<h2>Violations</h2><p>{shown}</p><div class="scroll">{table}</div>'


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
        kind = "n" if num(value) is not None else "t"
        cell = f'<td class="{kind}">{esc(_fmt(value))}</td>'
        cells.append(f"<tr><td>{esc(name)}</td>{cell}<td>{esc(unit)}</td></tr>")
    table = f"<table><caption>{esc(title(group))}</caption>{''.join(cells)}</table>"
    return f"<div>{table}<p>{esc(note)}</p></div>" if note else table


def _details(result: dict[str, Any]) -> str:
    """Return every scalar figure of the result, one table per group, known groups first."""
    groups = [k for k, v in result.items() if isinstance(v, dict)]
    rows: dict[str, list[tuple[str, object]]] = {}
    for group in sorted(groups, key=lambda g: list(GROUPS).index(g) if g in GROUPS else 99):
        host = _JOINED[group] if _JOINED.get(group) in groups else group
        rows.setdefault(host, []).extend(_flatten(result[group], f"{group}."))
    run = [(k, v) for k, v in result.items() if k not in SKIPPED and not isinstance(v, dict | list)]
    tables = []
    mode = _group(result, "params").get("mode")
    for group, figures in rows.items():
        note = ""
        if group == "ratios" and mode in _RESTARTS:
            figures = [f for f in figures if f[0].rsplit(".", 1)[-1] not in _RESTORE_TIME_RATIOS]
            note = (
                f"The time until all were restored is not divided by a bare server's: in "
                f"{mode} mode it includes the gateway's restart."
            )
        if figures:
            tables.append(_table(group, figures, note))
    tables.append(_table("run", run))
    return '<h2>Every figure</h2><div class="groups">' + "".join(tables) + "</div>"


def _meta(result: dict[str, Any]) -> str:
    """Return the line under the summary: date, tool and version, and the machine."""
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
    heading = f"hangon reconnect storm: {sessions} sessions, mode {mode}"
    restarts = " The latencies include the gateway's restart." if mode in _RESTARTS else ""
    plots = [latency_plot(_group(result, "restore_latency_ms"), note=restarts)]
    plots += [restored_plot(result), rss_plot(result)]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="Content-Security-Policy" '
        "content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>{esc(heading)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{esc(heading)}</h1>{_summary(result)}"
        f'<p class="meta">{esc(_meta(result))}</p>{_violations(result)}'
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

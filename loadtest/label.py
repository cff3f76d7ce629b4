"""Plain labels and units for the figures of a storm result.

The result's keys are for programs (``connect.drop_storm.server_cpu_ms_per_reconnect``); the
report shows a reader a label and a unit instead. A key not listed here (a newer tool's)
gets its words and a unit guessed from its name, so a report never shows a raw dotted key.
"""

from __future__ import annotations

__all__ = ["GROUPS", "SKIPPED", "label", "title"]

GROUPS = {
    "run": "Run",
    "params": "Parameters",
    "connect": "Connect phase",
    "turns": "Turns phase",
    "redis": "Redis",
    "storm": "Storm",
    "restore_latency_ms": "Restore latency",
    "gateway": "Gateway process",
    "gateway_idle": "Gateway at rest",
    "baseline": "Bare websockets server (baseline)",
    "ratios": "hangon ÷ bare server",
    "machine": "Machine",
}
"""Table titles of the result's top-level groups, in the order the report shows them."""

SKIPPED = frozenset({"samples", "restored_over_time", "rss_over_time", "events_s", "violations"})
"""Keys that are plotted or listed elsewhere, not shown as rows."""

_PERCENTILES = {"p50": "p50 (median)", "p95": "p95", "p99": "p99", "max": "maximum"}

_LABELS: dict[str, tuple[str, str]] = {
    "tool": ("Tool", ""),
    "version": ("Result format version", ""),
    "date": ("Date (UTC)", ""),
    "verified": ("Sessions verified", "sessions"),
    "ok": ("Passed", ""),
    "params.url": ("Gateway URL", ""),
    "params.sessions": ("Sessions", "sessions"),
    "params.turns": ("Turns per session before the storm", "turns"),
    "params.mode": ("Storm mode", ""),
    "params.gateways": ("Gateway processes run by the tool", "processes"),
    "params.gateway_cmd": ("Gateway command", ""),
    "params.connect_concurrency": ("Handshakes at once, at most", "handshakes"),
    "machine.cpus": ("CPUs", "CPUs"),
    "machine.platform": ("Platform", ""),
    "machine.python": ("Python", ""),
    "connect.seconds": ("Time to connect every session", "s"),
    "connect.rate_per_s": ("Connect rate", "sessions/s"),
    "turns.acked": ("Turns acknowledged", "turns"),
    "turns.seconds": ("Time for every turn", "s"),
    "turns.per_s": ("Acknowledged turns per second", "turns/s"),
    "turns.gateway_cpu_s": ("Gateway CPU for the turns", "CPU s"),
    "turns.gateway_cpu_us_per_turn": ("Gateway CPU per turn", "µs"),
    "turns.acked_per_gateway_cpu_s": ("Acknowledged turns per gateway CPU second", "turns/CPU s"),
    "redis.round_trips_per_turn": ("Redis round trips per turn", "round trips"),
    "storm.all_restored_s": ("Time until all were restored", "s"),
    "storm.restored": ("Sessions restored", "sessions"),
    "storm.shed": ("Connections shed by admission", "connections"),
    "storm.retried": ("Reconnect attempts beyond each session's first", "attempts"),
    "storm.reconnects": ("Reconnect attempts", "attempts"),
    "storm.gateway_restart_s": ("Gateway restart, from the signal to listening", "s"),
    "storm.gateway_cpu_s": ("Gateway CPU for the restores", "CPU s"),
    "gateway.cpu_s": ("Gateway CPU over the run, every process", "CPU s"),
    "gateway.cpu_ms_per_restore": ("Gateway CPU per restore", "ms"),
    "gateway.peak_rss_mb": ("Gateway peak RSS", "MiB"),
    "gateway_idle.rss_kib_per_session": ("Gateway RSS per idle session", "KiB"),
    "baseline.tool": ("Tool", ""),
    "baseline.sessions": ("Connections held at once", "connections"),
    "baseline.messages": ("Echo messages sent", "messages"),
    "baseline.date": ("Date", ""),
    "baseline.connect.seconds": ("Time to connect every connection", "s"),
    "baseline.connect.rate_per_s": ("Connect rate", "connections/s"),
    "baseline.connect.server_cpu_ms_per_connection": ("Server CPU per new connection", "ms"),
    "baseline.connect.server_rss_kib_per_connection": ("Server RSS per idle connection", "KiB"),
    "baseline.connect.drop_storm.seconds": ("Drop storm: time to reconnect every one", "s"),
    "baseline.connect.drop_storm.server_cpu_ms_per_reconnect": (
        "Drop storm: server CPU per reconnect",
        "ms",
    ),
    "baseline.connect.drop_storm.server_cpu_ms_per_reconnect_lowest": (
        "Drop storm: lowest round",
        "ms",
    ),
    "baseline.connect.drop_storm.server_cpu_ms_per_reconnect_highest": (
        "Drop storm: highest round",
        "ms",
    ),
    "baseline.echo.server_cpu_us_per_message": ("Echo: server CPU per message", "µs"),
    "baseline.echo.server_cpu_us_per_message_lowest": ("Echo: lowest round", "µs"),
    "baseline.echo.server_cpu_us_per_message_highest": ("Echo: highest round", "µs"),
    "baseline.rounds": ("Rounds of the drop storm and the echo", ""),
    "baseline.echo.messages_per_cpu_second": (
        "Echo: messages per server CPU second",
        "messages/CPU s",
    ),
    "baseline.machine.cpus": ("CPUs", "CPUs"),
    "baseline.machine.platform": ("Platform", ""),
    "baseline.machine.python": ("Python", ""),
    "baseline.machine.loadavg_1m": ("Load average before the run (1 min)", ""),
    "baseline.machine.websockets": ("websockets version", ""),
    "baseline.machine.uvloop": ("uvloop version", ""),
    "baseline.machine.orjson": ("orjson version", ""),
    "ratios.cpu_per_restore_vs_bare": ("CPU per restore ÷ bare CPU per new connection", "×"),
    "ratios.cpu_per_restore_vs_bare_storm": (
        "CPU per restore ÷ bare CPU per reconnect in a drop storm",
        "×",
    ),
    "ratios.restore_time_vs_bare_connect": ("Time until all restored ÷ bare connect time", "×"),
    "ratios.restore_time_vs_bare_storm": ("Time until all restored ÷ bare drop storm time", "×"),
    "ratios.rss_per_session_vs_bare": ("RSS per idle session ÷ bare per connection", "×"),
    "ratios.cpu_per_turn_vs_bare_echo": ("CPU per turn ÷ bare CPU per echoed message", "×"),
}
"""Label and unit per dotted key; an empty unit only for text and unitless numbers."""

_UNIT_WORDS = (("ms", "ms"), ("us", "µs"), ("kib", "KiB"), ("mb", "MiB"), ("mib", "MiB"))


def title(group: str) -> str:
    """Return the table title of a top-level group."""
    return GROUPS.get(group) or _words(group).capitalize()


def label(key: str) -> tuple[str, str]:
    """Return the plain label and the unit of a figure, given its dotted key.

    Args:
        key: the figure's keys from the top of the result, joined with dots
            (``baseline.connect.seconds``); figures of the run itself have no group.

    Returns:
        The label, and the unit ("" for text and unitless numbers).
    """
    if key in _LABELS:
        return _LABELS[key]
    parts = key.split(".")
    if parts[-2:-1] in (["restore_latency_ms"], ["latency_ms"]) and parts[-1] in _PERCENTILES:
        what = "Restore latency" if parts[0] == "restore_latency_ms" else "Connect latency"
        return f"{what} {_PERCENTILES[parts[-1]]}", "ms"
    if parts[0] == "ratios":
        return _words(parts[-1]).capitalize(), "×"
    words = " · ".join(_words(p) for p in parts[1:] or parts)
    return words[:1].upper() + words[1:], _guess_unit(parts[-1])


def _words(key: str) -> str:
    """Return a key's words: underscores become spaces."""
    return key.replace("_", " ").strip()


def _guess_unit(key: str) -> str:
    """Return the unit a key's name implies, or "" when it implies none."""
    words = key.lower().split("_")
    for word, unit in _UNIT_WORDS:
        if word in words:
            return unit
    if words[-2:] == ["per", "s"]:
        return "per s"
    return "s" if words[-1] in ("s", "seconds") else ""

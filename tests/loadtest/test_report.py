"""The storm report: one self-contained, well-formed HTML page that escapes what it shows."""

from __future__ import annotations

import html
import io
import itertools
import json
import random
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from loadtest.report import render_html, write_report
from loadtest.storm import Progress

ROOT = Path(__file__).resolve().parents[2]
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr"}


class TagChecker(HTMLParser):
    """Checks that every element is closed in order, and collects tags and attribute values."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.values: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Open an element unless it is void."""
        self.tags.append(tag)
        self.values += [v or "" for _, v in attrs]
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Record a self-closed SVG element."""
        self.tags.append(tag)
        self.values += [v or "" for _, v in attrs]

    def handle_endtag(self, tag: str) -> None:
        """Close the innermost open element, which must be this one."""
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(f"unexpected </{tag}>")


class Cells(HTMLParser):
    """Collects the text of each table row's cells, each row led by its table's caption."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.caption = ""
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        """Start a row at <tr>, a cell at <td> or <caption>."""
        if tag == "tr":
            self.rows.append([self.caption])
        elif tag in ("td", "caption"):
            self.cell = []

    def handle_endtag(self, tag: str) -> None:
        """End the cell at </td>, the caption at </caption>."""
        if tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
        elif tag == "caption" and self.cell is not None:
            self.caption = "".join(self.cell)
        self.cell = None

    def handle_data(self, data: str) -> None:
        """Keep the text inside a cell."""
        if self.cell is not None:
            self.cell.append(data)


def figure_rows(page: str) -> list[list[str]]:
    """Return the table, label, value and unit of every row of the figure tables."""
    cells = Cells()
    cells.feed(page[page.index("<h2>Every figure</h2>") :])
    return [row for row in cells.rows if len(row) == 4]


def figures(page: str) -> dict[tuple[str, str], list[str]]:
    """Return the value and unit of every figure, by its table's title and its label."""
    return {(table, name): rest for table, name, *rest in figure_rows(page)}


def summary_of(page: str) -> str:
    """Return the summary section's text, tags removed."""
    section = page[page.index('<section class="summary">') : page.index("</section>")]
    return re.sub(r"<[^>]+>", " ", html.unescape(section))


def check(page: str) -> TagChecker:
    """Parse a page, assert every element is closed in order, and return the checker."""
    checker = TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == []
    assert checker.stack == []
    return checker


def full_result() -> dict[str, Any]:
    """Return a realistic drop storm result: 1000 sessions, 2000 latency samples, two series,
    and every figure the storm tool and its baseline write."""
    rng = random.Random(7)
    samples = [rng.lognormvariate(3.8, 0.7) for _ in range(2000)]
    restored = [[i / 10, min(1000, int(1000 * (1 - 0.75**i)) + 2 * i)] for i in range(21)]
    machine = {"cpus": 2, "platform": "Linux-6.1-x86_64", "python": "3.11.7"}
    return {
        "tool": "hangon-storm",
        "version": 1,
        "date": "2026-11-26T03:30:00Z",
        "params": {
            "url": "ws://127.0.0.1:8799/ws",
            "sessions": 1000,
            "turns": 5,
            "mode": "drop",
            "gateways": 1,
            "gateway_cmd": "hangon serve --port 8799",
            "connect_concurrency": 500,
        },
        "machine": machine,
        "baseline": {
            "tool": "hangon-baseline",
            "sessions": 1000,
            "messages": 50000,
            "connect": {
                "seconds": 1.7,
                "rate_per_s": 588.2,
                "latency_ms": {"p50": 101.57, "p95": 135.93, "p99": 139.74, "max": 141.01},
                "server_cpu_ms_per_connection": 0.4,
                "server_rss_kib_per_connection": 16.0,
                "drop_storm": {"seconds": 1.1, "server_cpu_ms_per_reconnect": 0.5},
            },
            "echo": {"server_cpu_us_per_message": 31.0, "messages_per_cpu_second": 32258},
            "machine": {**machine, "loadavg_1m": 0.9, "websockets": "17.4"},
            "date": "2026-11-26",
        },
        "connect": {"seconds": 2.1, "rate_per_s": 476.0},
        "gateway_idle": {"rss_kib_per_session": 20.0},
        "turns": {
            "acked": 5000,
            "seconds": 3.2,
            "per_s": 1560.0,
            "gateway_cpu_s": 0.45,
            "gateway_cpu_us_per_turn": 90.0,
            "acked_per_gateway_cpu_s": 11111.1,
        },
        "redis": {"round_trips_per_turn": 0.05},
        "gateway": {
            "cpu_ms_per_restore": 1.2,
            "cpu_s": 4.2,
            "peak_rss_mb": 180.5,
            "rss_over_time": [[i * 0.5, 120 + 60 * min(1, i / 8)] for i in range(20)],
            "events_s": {"connect": 1.0, "storm": 5.0, "all_restored": 6.3},
        },
        "storm": {
            "all_restored_s": 1.3,
            "restored": 1000,
            "shed": 120,
            "retried": 130,
            "reconnects": 1130,
            "gateway_cpu_s": 1.2,
        },
        "restore_latency_ms": {
            "p50": 44.7,
            "p95": 141.0,
            "p99": 226.0,
            "max": round(max(samples), 2),
            "samples": samples,
        },
        "restored_over_time": restored,
        "verified": 1000,
        "ratios": {
            "cpu_per_restore_vs_bare": 3.0,
            "restore_time_vs_bare_connect": 0.76,
            "cpu_per_restore_vs_bare_storm": 2.4,
            "restore_time_vs_bare_storm": 1.18,
            "rss_per_session_vs_bare": 1.25,
            "cpu_per_turn_vs_bare_echo": 2.9,
        },
        "violations": [],
        "ok": True,
    }


def kill_result() -> dict[str, Any]:
    """Return the same result as a kill storm would give it: the restart is in the restore
    times (0.72 s of 2.93 s), and the restore-time ratios are large for it."""
    result = full_result()
    result["params"]["mode"] = "kill"
    result["storm"].update(all_restored_s=2.93, gateway_restart_s=0.72)
    result["ratios"].update(restore_time_vs_bare_connect=9.29, restore_time_vs_bare_storm=8.65)
    events = {"connect": 1.0, "storm": 5.0, "stopped": 5.02, "restarted": 5.72, "all_restored": 7.9}
    result["gateway"]["events_s"] = events
    result["restore_latency_ms"].update(p50=1066.1, p95=1811.3, p99=2065.4)
    result["restore_latency_ms"]["samples"] += [2400.0, 2881.2]
    return result


def test_full_report_has_three_titled_plots_and_every_figure() -> None:
    """A full result gives a well-formed page with three titled SVG plots and the figures."""
    page = render_html(full_result())
    checker = check(page)
    assert page.count("<svg") == 3
    assert checker.tags.count("title") == 4  # the page's and one per plot
    for label in ("restore latency (ms)", "time since the storm began (s)", "gateway RSS (MiB)"):
        assert label in page
    assert "p50 44.7 ms" in page and "p99 226 ms" in page
    assert "all 1,000 sessions" in page
    assert "PASSED: 1,000 of 1,000 sessions restored whole and verified" in page
    assert "banner fail" not in page
    rows = figures(page)
    assert rows["Connect phase", "Connect rate"] == ["476.0", "sessions/s"]
    assert rows["Bare websockets server (baseline)", "Connect rate"] == ["588.2", "connections/s"]
    assert rows["Turns phase", "Redis round trips per turn"] == ["0.05", "round trips"]
    assert rows["Bare websockets server (baseline)", "Echo: server CPU per message"] == [
        "31",
        "µs",
    ]
    assert "Linux-6.1-x86_64" in page


def test_summary_comes_first_with_the_figures_a_reader_looks_for() -> None:
    """The summary is the first thing under the title, before any table or plot, and holds
    the verdict, N and mode, time until all restored, p50/p99, and CPU per restore, CPU per
    turn and RSS per session, each against the bare server."""
    page = render_html(full_result())
    body = page[page.index("<body>") :]
    assert re.match(r"<body><h1>[^<]*</h1><section class=\"summary\">", body)
    summary_end = page.index("</section>")
    assert summary_end < page.index("<table") and summary_end < page.index("<svg")
    text = " ".join(summary_of(page).split())
    for expected in (
        "PASSED",
        "1,000 · drop",
        "every client connection aborted at once",
        "Time until all were restored 1.3 s 1.18× a bare server's same drop storm (1.1 s)",
        "Restore latency p50 / p99 44.7 / 226 ms",
        "Gateway CPU per restore 1.2 ms 2.40× a bare server's reconnect in a drop storm",
        "Gateway CPU per turn 90 µs 2.90× a bare server's echoed message (31 µs)",
        "Gateway RSS per idle session 20 KiB 1.25× a bare server's idle connection (16 KiB)",
    ):
        assert expected in text


def test_a_failed_run_says_so_first() -> None:
    """A failed run's summary starts with the red banner; the violations follow it, before
    any plot."""
    result = full_result()
    result["ok"] = False
    result["violations"] = [{"session": "storm-7", "problem": "restored version 3, acked 4"}]
    page = render_html(result)
    assert summary_of(page).split()[:3] == ["FAILED:", "1", "violation"]
    assert page.index("</section>") < page.index("storm-7") < page.index("<svg")


def test_every_row_has_a_plain_label_and_a_unit() -> None:
    """No row of the figure tables is named by a raw key, and every number has a unit, the
    right one: rates are per second or per CPU second, the baseline's latencies are in ms,
    memory in binary units."""
    rows = figure_rows(render_html(kill_result()))
    assert len(rows) > 60
    unitless = {"Result format version", "Load average before the run (1 min)"}
    for _, name, value, unit in rows:
        assert "_" not in name and not re.search(r"\w\.\w", name), name
        numeric = re.fullmatch(r"-?[\d,]+(\.\d+)?", value)
        if numeric and name not in unitless and not name.endswith("version"):
            assert unit, name
    units = {name: unit for _, name, _, unit in rows}
    assert units["Acknowledged turns per gateway CPU second"] == "turns/CPU s"
    assert units["Acknowledged turns per second"] == "turns/s"
    for p in ("p50 (median)", "p95", "p99", "maximum"):
        assert units[f"Connect latency {p}"] == "ms"
        assert units[f"Restore latency {p}"] == "ms"
    assert units["Gateway peak RSS"] == "MiB"
    assert units["Drop storm: server CPU per reconnect"] == "ms"
    assert units["Gateway restart, from the signal to listening"] == "s"


def test_an_unknown_figure_still_gets_words_and_a_unit() -> None:
    """A figure a newer tool adds is shown in words with a unit guessed from its name."""
    result = full_result()
    result["storm"]["first_restore_ms"] = 12.5
    result["extra"] = {"queue": {"peak_kib": 3.0}}
    rows = figures(render_html(result))
    assert rows["Storm", "First restore ms"] == ["12.5", "ms"]
    assert rows["Extra", "Queue · peak kib"] == ["3", "KiB"]


def test_kill_mode_compares_no_restore_time_with_bare() -> None:
    """In kill mode the time until all were restored includes the gateway's restart: the
    summary says so and gives no ratio for it, and the ratio table leaves those ratios out;
    CPU per restore is set against a bare server's new connection."""
    page = html.unescape(render_html(kill_result()))
    text = " ".join(summary_of(page).split())
    restored = text[text.index("Time until all were restored") : text.index("Restore latency")]
    assert restored.strip() == (
        "Time until all were restored 2.93 s includes the gateway's restart (0.72 s), "
        "so not compared with a bare server"
    )
    assert "×" not in restored
    assert "9.29" not in page and "8.65" not in page
    assert "÷ bare connect time" not in page and "÷ bare drop storm time" not in page
    assert "in kill mode it includes the gateway's restart" in page
    assert "Gateway CPU per restore 1.2 ms 3.00× a bare server's new connection (0.4 ms)" in text
    assert "The latencies include the gateway's restart." in page


def test_drop_mode_keeps_its_restore_time_ratios() -> None:
    """In drop mode both restore-time ratios stay in the ratio table, with plain labels."""
    rows = figures(render_html(full_result()))
    ratios = "hangon ÷ bare server"
    assert rows[ratios, "Time until all restored ÷ bare drop storm time"] == ["1.18", "×"]
    assert rows[ratios, "Time until all restored ÷ bare connect time"] == ["0.76", "×"]


def test_histogram_legend_is_above_the_axes_and_ticks_read_alike() -> None:
    """The histogram's legend is in a row above the axes, where it covers no percentile
    line, and the overflow tick is written as the other ticks are (2,065, not 2.06e+03)."""
    page = render_html(kill_result())
    svg = page[page.index("<svg") : page.index("</svg>")]
    axes = re.search(r'<path d="M[\d.]+ ([\d.]+)V', svg)
    assert axes is not None
    top = float(axes.group(1))
    legend = re.findall(r'<rect x="[\d.]+" y="([\d.]+)" width="18" height="10"', svg)
    assert legend and all(float(y) + 10 < top for y in legend)
    red = [float(y) for y in re.findall(r'<line [^>]*y1="([\d.]+)"[^>]*stroke="#b3261e"', svg)]
    assert len([y for y in red if y >= top]) == 3  # p50, p95, p99
    assert len([y for y in red if y < top]) == 1  # the legend's sample of them
    assert ">&gt; 2,065<" in svg
    assert "e+" not in page


def test_rss_plot_marks_the_kill_and_the_restart() -> None:
    """The RSS plot marks the SIGKILL and the restart, and its line breaks between the two
    processes; a drop storm's plot marks the drop."""
    page = render_html(kill_result())
    svg = page[page.index("Gateway resident memory") :]
    svg = svg[: svg.index("</svg>")]
    for label in ("sessions connect", "SIGKILL", "listening again", "all restored"):
        assert f">{label}</text>" in svg
    assert len(re.findall(r'<path d="M[^"]*" fill="none" stroke="#1f5fa8"', svg)) == 2
    drop = render_html(full_result())
    assert ">connections dropped</text>" in drop[drop.index("Gateway resident memory") :]


def test_all_restored_marker_is_labelled() -> None:
    """The restored plot labels the moment all were restored on the plot itself, with a
    dot where the line reaches every session, and marks when the gateway listened again."""
    page = render_html(kill_result())
    svg = page[page.index("Sessions restored during the storm") :]
    svg = svg[: svg.index("</svg>")]
    assert ">all restored, 2.93 s</text>" in svg
    assert "<circle" in svg
    assert ">listening again, 0.72 s</text>" in svg


def test_minimal_report_shows_placeholders() -> None:
    """A result with only params and ok renders, with notes in place of the plots."""
    page = render_html({"params": {"sessions": 10, "mode": "kill"}, "ok": True})
    check(page)
    assert "<svg" not in page
    assert page.count('class="missing"') == 3
    assert "10 sessions, mode kill" in page


def test_report_loads_nothing() -> None:
    """No script, link or URL in any attribute; URLs appear only as escaped result text."""
    result = full_result()
    result["params"]["url"] = "https://example.com/ws?a=1&b=<2>"
    result["violations"] = [{"session": "s1", "problem": "see http://evil.example/x.js"}]
    page = render_html(result)
    checker = check(page)
    assert not {"script", "link", "img", "iframe", "object", "image", "use"} & set(checker.tags)
    assert not [v for v in checker.values if "//" in v or "url(" in v]
    assert "url(" not in page and "@import" not in page
    rest = page.replace("https://example.com/ws?a=1&amp;b=&lt;2&gt;", "")
    rest = rest.replace("see http://evil.example/x.js", "")
    assert "http://" not in rest and "https://" not in rest


def test_violations_are_escaped_counted_and_capped() -> None:
    """Violations give a red banner with the full count and a table of the first 50, escaped."""
    result = full_result()
    result["violations"] = [
        {"session": f"caller-{i}", "problem": f"restored version {i}, acked {i + 1}"}
        for i in range(1234)
    ]
    result["violations"][0]["session"] = "<script>alert(1)</script>"
    page = render_html(result)
    check(page)
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "FAILED: 1,234 violations (yet the result says ok = true)" in page
    assert page.index("banner fail") < page.index("<svg")
    assert "caller-49<" in page and "caller-50<" not in page
    assert "First 50 of 1,234." in page


def test_ok_false_without_violations_is_a_failure() -> None:
    """A run that says ok = false is shown in red even when it lists no violation."""
    page = render_html({"params": {}, "ok": False})
    assert "banner fail" in page and "ok = false" in page


def test_cli_writes_the_file(tmp_path: Path) -> None:
    """`python -m loadtest.report result.json -o report.html` writes the page."""
    source, target = tmp_path / "result.json", tmp_path / "report.html"
    source.write_text(json.dumps(full_result()), encoding="utf-8")
    command = [sys.executable, "-m", "loadtest.report", str(source), "-o", str(target)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=30)
    assert target.read_text(encoding="utf-8").count("<svg") == 3


def test_write_report(tmp_path: Path) -> None:
    """write_report writes what render_html returns, in UTF-8."""
    result = full_result()
    write_report(result, tmp_path / "r.html")
    assert (tmp_path / "r.html").read_text(encoding="utf-8") == render_html(result)


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        """Claim to be a TTY."""
        return True


def run_phases(progress: Progress) -> None:
    """Show three phases as the storm tool does, several updates each, then end."""
    for phase, total in (("connect", 200), ("turns", 1000), ("storm", 200)):
        for done in range(0, total + 1, total // 4):
            progress.show(phase, done, total)
    progress.end()


def test_progress_without_a_tty_is_one_line_per_phase() -> None:
    """Written to a file, progress is one line per phase with its final count and time,
    and no carriage return."""
    stream = io.StringIO()
    run_phases(Progress(True, stream=stream, clock=itertools.count(0.0, 0.5).__next__))
    text = stream.getvalue()
    assert "\r" not in text
    assert text.splitlines() == [
        "connect: 200/200 in 0.5 s",
        "turns: 1000/1000 in 0.5 s",
        "storm: 200/200 in 0.5 s",
    ]


def test_progress_on_a_tty_is_a_bar_per_phase() -> None:
    """On a terminal, each phase is a bar rewritten in place, ended by a newline."""
    stream = Terminal()
    run_phases(Progress(True, stream=stream))
    lines = stream.getvalue().split("\n")
    assert lines[-1] == ""
    assert len(lines) == 4
    assert all(line.startswith("\r") for line in lines[:3])
    assert lines[2].rsplit("\r", 1)[-1] == f"storm    [{'#' * 30}] 200/200"


def test_quiet_progress_writes_nothing() -> None:
    """--quiet writes no progress at all, terminal or not."""
    for stream in (io.StringIO(), Terminal()):
        run_phases(Progress(False, stream=stream))
        assert stream.getvalue() == ""

"""The status page at `/` and the dispatch page at `/dispatches/{id}`: server-rendered
HTML, the pictures as inline SVG, refreshed by the browser every few seconds
(`<meta http-equiv="refresh">`); no script, nothing loaded from elsewhere. Every value
is escaped."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape
from typing import Any

from dispatcher.activity import FINAL, Minute
from dispatcher.gate import GateKind, GateState, kind_of
from dispatcher.models import DispatchStatus
from dispatcher.views import ScheduleView

REFRESH_SECONDS = 2
ERROR_CHARS = 300
CHART_WIDTH = 600
CHART_HEIGHT = 120
CHART_LEFT = 44
"""Room for the value labels left of a chart."""
COLOURS = {"succeeded": "#2f7d4f", "failed": "#b3261e", "cancelled": "#8a93a0"}


@dataclass(frozen=True, slots=True)
class BranchRow:
    """One step an in-flight dispatch runs, or waits to run, beside its others."""

    step: str
    index: int
    attempt: int | None
    waiting_for: str | None


@dataclass(frozen=True, slots=True)
class RunningRow:
    """A dispatch this daemon works on now, and the step it is at (its first branch)."""

    id: int
    task: str
    status: str
    step: str | None
    started_at: datetime | None
    waiting_for: str | None = None
    """The gate whose place it waits for (then it runs nothing)."""
    step_index: int = 0
    steps: int | None = None
    attempt: int | None = None
    branches: tuple[BranchRow, ...] = ()
    """Every step it runs now; more than one when its plan has parallel branches."""


@dataclass(frozen=True, slots=True)
class QueuedRow:
    """A queued dispatch: what holds it back, if anything but its turn."""

    id: int
    task: str
    priority: int
    created_at: datetime
    waiting_for: str | None
    not_before: datetime | None


@dataclass(frozen=True, slots=True)
class FailureRow:
    """A recently failed dispatch, why, and the end of its output."""

    id: int
    task: str
    finished_at: datetime | None
    error: str | None
    output_tail: str | None = None


@dataclass(frozen=True, slots=True)
class StatusView:
    """Everything the page shows, gathered by the API handler."""

    instance_id: str
    version: str
    started_at: datetime
    now: datetime
    stopping: bool
    gates: Sequence[GateState]
    queue: Mapping[DispatchStatus, int]
    running: Sequence[RunningRow]
    failures: Sequence[FailureRow]
    queued: Sequence[QueuedRow] = ()
    minutes: Sequence[Minute] = ()
    in_flight: int | None = None
    """Dispatches in flight here (None: as many as `running` shows)."""
    schedules: Sequence[ScheduleView] = ()
    """The schedules, as `schedules` lists them (the section shows when any)."""


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #1d2430;
       background: #f6f7f9; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
a { color: #1f5fa8; }
.meta { color: #5b6472; } .stopping { color: #b3261e; font-weight: 600; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: .6em 1em 1em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eceef2;
         vertical-align: top; }
th { color: #5b6472; font-weight: 600; }
.bar { background: #e6e9ee; border-radius: 4px; height: 14px; width: 260px; overflow: hidden; }
.fill { background: #2f7d4f; height: 100%; } .fill.full { background: #c2571a; }
.num { font-variant-numeric: tabular-nums; } .error { color: #b3261e; white-space: pre-wrap; }
.waiting { color: #9a5b00; font-weight: 600; }
.empty { color: #8a93a0; font-style: italic; } .note { color: #5b6472; font-size: .9em; }
.queue span { display: inline-block; margin-right: 1.5em; }
pre.tail { background: #f3f4f6; border-radius: 4px; padding: .4em .6em; margin: .3em 0 0;
           white-space: pre-wrap; font-size: 12px; max-height: 18em; overflow: auto; }
svg text { font: 11px system-ui, sans-serif; fill: #5b6472; }
.legend span { margin-right: 1.2em; } .swatch { display: inline-block; width: .8em;
  height: .8em; margin-right: .3em; vertical-align: -1px; }
"""


def _ts(value: datetime | str | None) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value.replace("T", " ").split(".")[0].removesuffix("Z") + " UTC"
    return value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return ""
    seconds = max(0, int((now - then).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _link(dispatch_id: int) -> str:
    return f'<a href="dispatches/{dispatch_id}">{dispatch_id}</a>'


def _gates(gates: Sequence[GateState], queued: int) -> str:
    rows = []
    for gate in gates:
        share = 0 if gate.capacity <= 0 else min(100, round(100 * gate.held / gate.capacity))
        full = " full" if gate.held >= gate.capacity else ""
        waiting = _gate_waiting(gate, queued)
        rows.append(
            f'<tr class="gate" data-gate="{escape(gate.name)}" data-held="{gate.held}" '
            f'data-capacity="{gate.capacity}"><td>{escape(gate.name)}</td>'
            f'<td><div class="bar"><div class="fill{full}" style="width:{share}%"></div></div></td>'
            f'<td class="num">{gate.held} / {gate.capacity}</td>'
            f'<td class="num">{waiting}</td></tr>'
        )
    head = "<tr><th>gate</th><th>fill</th><th>held / capacity</th><th>waiting</th></tr>"
    note = (
        '<p class="note">waiting: for <b>global</b>, the dispatches in the queue (each '
        "waits for a global place, and some also for a per-task place or its time); "
        "for a <b>runner</b> gate, dispatches in flight whose next step waits for a place."
        "</p>"
    )
    return _table(head, rows, 4, "no gates") + note


def _gate_waiting(gate: GateState, queued: int) -> str:
    kind = kind_of(gate.name)
    if kind is GateKind.GLOBAL:
        return f'<span data-waiting="{queued}">{queued} queued</span>'
    if kind is GateKind.RUNNER:
        return f'<span data-waiting="{gate.waiting}">{gate.waiting}</span>'
    return ""  # per-task gates: their waiters are queued dispatches, listed below


def _queue(queue: Mapping[DispatchStatus, int], in_flight: int) -> str:
    shown = [("queued", queue.get(DispatchStatus.QUEUED, 0)), ("in flight", in_flight)]
    shown += [(str(s), queue.get(s, 0)) for s in DispatchStatus if s.is_final]
    items = "".join(
        f'<span class="status" data-status="{escape(name)}">{escape(name)}: '
        f'<b class="num">{count}</b></span>'
        for name, count in shown
    )
    return f'<div class="queue">{items}</div>'


def _state(status: str, waiting_for: str | None) -> str:
    if waiting_for:
        return f'<span class="waiting">waiting</span> for {escape(waiting_for)}'
    return escape(status)


def _running(now: datetime, rows: Sequence[RunningRow]) -> str:
    body = []
    for row in rows:
        step = row.step or ""
        if row.steps and row.step:
            step = f"{row.step_index + 1}/{row.steps} {row.step}"
        attempt = "" if row.attempt is None or row.waiting_for else f"#{row.attempt}"
        shown = escape(step)
        if len(row.branches) > 1:
            shown, attempt = _branches(row.branches), ""
        body.append(
            f'<tr class="running" data-id="{row.id}" '
            f'data-waiting-for="{escape(row.waiting_for or "")}">'
            f'<td class="num">{_link(row.id)}</td>'
            f"<td>{escape(row.task)}</td><td>{_state(row.status, row.waiting_for)}</td>"
            f'<td>{shown}</td><td class="num">{attempt}</td>'
            f"<td>{escape(_ts(row.started_at))}</td>"
            f'<td class="num">{escape(_ago(now, row.started_at))}</td></tr>'
        )
    head = (
        "<tr><th>id</th><th>task</th><th>status</th><th>current step</th><th>attempt</th>"
        "<th>started</th><th>for</th></tr>"
    )
    return _table(head, body, 7, "nothing in flight")


def _branches(branches: Sequence[BranchRow]) -> str:
    """Steps running side by side, one a line: `test #1`, `lint waiting for runner:x`."""
    lines = []
    for branch in branches:
        if branch.waiting_for:
            state = _state("", branch.waiting_for)
        else:
            state = "" if branch.attempt is None else f"#{branch.attempt}"
        lines.append(
            f'<div class="branch" data-step="{escape(branch.step)}">'
            f"{escape(branch.step)} {state}</div>"
        )
    return "".join(lines)


def _queued(rows: Sequence[QueuedRow], total: int) -> str:
    body = []
    for row in rows:
        if row.waiting_for:
            why = _state("queued", row.waiting_for)
        elif row.not_before is not None:
            why = f"its time: {escape(_ts(row.not_before))}"
        else:
            why = "its turn"
        body.append(
            f'<tr class="queued" data-id="{row.id}"><td class="num">{_link(row.id)}</td>'
            f'<td>{escape(row.task)}</td><td class="num">{row.priority}</td>'
            f"<td>{escape(_ts(row.created_at))}</td><td>{why}</td></tr>"
        )
    head = "<tr><th>id</th><th>task</th><th>priority</th><th>submitted</th><th>waits for</th></tr>"
    note = (
        f'<p class="note">the {len(rows)} newest of {total} queued</p>' if total > len(rows) else ""
    )
    return _table(head, body, 5, "nothing queued") + note


def _schedules(rows: Sequence[ScheduleView]) -> str:
    body = []
    for row in rows:
        when = f"every {row.every}" if row.every else f"cron {row.cron}"
        if row.cron and row.timezone != "UTC":
            when += f" ({row.timezone})"
        last = ""
        if row.last_outcome == "skipped":
            last = "skipped (the previous one had not ended)"
        elif row.last_dispatch_id is not None:
            status = escape(row.last_status or "deleted")
            last = f"{_link(row.last_dispatch_id)} {status}"
        body.append(
            f'<tr class="schedule" data-schedule="{escape(row.name)}">'
            f"<td>{escape(row.name)}</td><td>{escape(row.task)}</td>"
            f"<td>{escape(when)}</td><td>{escape(row.overlap)}</td>"
            f"<td>{escape(_ts(row.next_fire) or 'never')}</td>"
            f"<td>{escape(_ts(row.last_fire) or 'never')}</td><td>{last}</td></tr>"
        )
    head = (
        "<tr><th>schedule</th><th>task</th><th>when</th><th>overlap</th><th>next fire</th>"
        "<th>last fire</th><th>last dispatch</th></tr>"
    )
    return _table(head, body, 7, "no schedules")


def _failures(rows: Sequence[FailureRow]) -> str:
    body = []
    for row in rows:
        error = row.error or ""
        if len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + "…"
        tail = f'<pre class="tail">{escape(row.output_tail)}</pre>' if row.output_tail else ""
        body.append(
            f'<tr class="failure" data-id="{row.id}"><td class="num">{_link(row.id)}</td>'
            f"<td>{escape(row.task)}</td><td>{escape(_ts(row.finished_at))}</td>"
            f'<td><div class="error">{escape(error)}</div>{tail}</td></tr>'
        )
    head = "<tr><th>id</th><th>task</th><th>failed at</th><th>error and output</th></tr>"
    return _table(head, body, 4, "no recent failures")


def _table(head: str, rows: list[str], columns: int, empty: str) -> str:
    if not rows:
        rows = [f'<tr><td colspan="{columns}" class="empty">{escape(empty)}</td></tr>']
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


# -- the picture of the last hour -----------------------------------------------------------


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:.0f}ms"
    return f"{value:.1f}s" if value < 60 else f"{value / 60:.1f}m"


def _axes(top_label: str) -> str:
    bottom = CHART_HEIGHT
    return (
        f'<line x1="{CHART_LEFT}" y1="0" x2="{CHART_LEFT}" y2="{bottom}" stroke="#c4c9d2"/>'
        f'<line x1="{CHART_LEFT}" y1="{bottom}" x2="{CHART_LEFT + CHART_WIDTH}" '
        f'y2="{bottom}" stroke="#c4c9d2"/>'
        f'<text x="{CHART_LEFT - 4}" y="10" text-anchor="end">{escape(top_label)}</text>'
        f'<text x="{CHART_LEFT - 4}" y="{bottom}" text-anchor="end">0</text>'
        f'<text x="{CHART_LEFT}" y="{bottom + 14}">60 min ago</text>'
        f'<text x="{CHART_LEFT + CHART_WIDTH}" y="{bottom + 14}" text-anchor="end">now</text>'
    )


def _svg(label: str, body: str) -> str:
    width, height = CHART_LEFT + CHART_WIDTH + 4, CHART_HEIGHT + 20
    return (
        f'<svg role="img" aria-label="{escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(label)}</title>{body}</svg>"
    )


def finished_chart(minutes: Sequence[Minute]) -> str:
    """Dispatches finished per minute, stacked by status."""
    peak = max([*(m.total for m in minutes), 1])
    slot = CHART_WIDTH / max(len(minutes), 1)
    bars = []
    for index, minute in enumerate(minutes):
        x = CHART_LEFT + index * slot + 1
        y = float(CHART_HEIGHT)
        rects = []
        for status in FINAL:
            count = minute.finished.get(status, 0)
            if not count:
                continue
            height = CHART_HEIGHT * count / peak
            y -= height
            rects.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot - 2:.1f}" height="{height:.1f}" '
                f'fill="{COLOURS[status]}"/>'
            )
        counts = ", ".join(f"{minute.finished.get(s, 0)} {s}" for s in FINAL)
        data = " ".join(f'data-{s}="{minute.finished.get(s, 0)}"' for s in FINAL)
        bars.append(
            f'<g class="minute" data-minute="{minute.start:%H:%M}" {data}>'
            f"<title>{minute.start:%H:%M} UTC: {counts}</title>{''.join(rects)}</g>"
        )
    return _svg("dispatches finished per minute", _axes(str(peak)) + "".join(bars))


def latency_chart(minutes: Sequence[Minute]) -> str:
    """p50 and p95 of the time from submit to start, per minute (gaps: no starts)."""
    values = [m.p95 for m in minutes if m.p95 is not None]
    peak = max([*values, 0.001])
    slot = CHART_WIDTH / max(len(minutes), 1)
    paths: dict[str, list[str]] = {"p50": [], "p95": []}
    marks = []
    for index, minute in enumerate(minutes):
        if minute.p50 is None or minute.p95 is None:
            for points in paths.values():
                points.append("")  # a gap: the next point starts a new line
            continue
        x = CHART_LEFT + index * slot + slot / 2
        for name, value in (("p50", minute.p50), ("p95", minute.p95)):
            y = CHART_HEIGHT - CHART_HEIGHT * value / peak
            paths[name].append(f"{x:.1f},{y:.1f}")
        marks.append(
            f'<g class="latency" data-minute="{minute.start:%H:%M}" data-starts="{minute.starts}" '
            f'data-p50="{minute.p50:.6f}" data-p95="{minute.p95:.6f}">'
            f"<title>{minute.start:%H:%M} UTC: {minute.starts} started, p50 "
            f"{_seconds(minute.p50)}, p95 {_seconds(minute.p95)}</title>"
            f'<circle cx="{x:.1f}" cy="{CHART_HEIGHT - CHART_HEIGHT * minute.p50 / peak:.1f}" '
            f'r="2.5" fill="#1f5fa8"/>'
            f'<circle cx="{x:.1f}" cy="{CHART_HEIGHT - CHART_HEIGHT * minute.p95 / peak:.1f}" '
            f'r="2.5" fill="#c2571a"/></g>'
        )
    lines = _polyline(paths["p50"], "#1f5fa8", "") + _polyline(paths["p95"], "#c2571a", "4 3")
    return _svg(
        "time from submit to start, p50 and p95", _axes(_seconds(peak)) + lines + "".join(marks)
    )


def _polyline(points: list[str], colour: str, dash: str) -> str:
    runs, run = [], []
    for point in [*points, ""]:
        if point:
            run.append(point)
        elif run:
            runs.append(run)
            run = []
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return "".join(
        f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="2"'
        f"{dashed}/>"
        for run in runs
    )


def _activity(minutes: Sequence[Minute]) -> str:
    if not minutes:
        return '<p class="empty">no activity recorded</p>'
    legend = "".join(
        f'<span><i class="swatch" style="background:{COLOURS[s]}"></i>{s}</span>' for s in FINAL
    )
    finished = sum(m.total for m in minutes)
    return (
        f'<div class="legend">dispatches finished per minute ({finished} in the hour): '
        f"{legend}</div>{finished_chart(minutes)}"
        '<div class="legend">time from submit to start: '
        '<span><i class="swatch" style="background:#1f5fa8"></i>p50</span>'
        '<span><i class="swatch" style="background:#c2571a"></i>p95 (dashed)</span></div>'
        f"{latency_chart(minutes)}"
        '<p class="note">this daemon since it started, at most the last hour '
        "(a dispatch counts in the minute it finished, or first started)</p>"
    )


def _page(title: str, body: str, refresh: bool = True) -> str:
    meta = f'<meta http-equiv="refresh" content="{REFRESH_SECONDS}">' if refresh else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
{meta}
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{escape(title)}</title><style>{_STYLE}</style></head>
<body>
{body}
</body></html>
"""


def render(view: StatusView) -> str:
    """The whole status page."""
    state = '<span class="stopping">stopping (draining)</span>' if view.stopping else "serving"
    queued = view.queue.get(DispatchStatus.QUEUED, 0)
    in_flight = len(view.running) if view.in_flight is None else view.in_flight
    body = f"""<h1>dispatcher</h1>
<div class="meta">instance <b>{escape(view.instance_id)}</b> · version {escape(view.version)}
 · up {escape(_ago(view.now, view.started_at))} · {state} · {escape(_ts(view.now))}</div>
<h2>Gates</h2><section id="gates">{_gates(view.gates, queued)}</section>
<h2>Queue</h2><section id="queue">{_queue(view.queue, in_flight)}</section>
<h2>In flight</h2><section id="inflight">{_running(view.now, view.running)}</section>
<h2>Queued</h2><section id="queued">{_queued(view.queued, queued)}</section>
<h2>Recent failures</h2><section id="failures">{_failures(view.failures)}</section>
<h2>The last hour</h2><section id="activity">{_activity(view.minutes)}</section>"""
    if view.schedules:
        body += f"""
<h2>Schedules</h2><section id="schedules">{_schedules(view.schedules)}</section>"""
    return _page(f"dispatcher {view.instance_id}", body)


# -- one dispatch ---------------------------------------------------------------------------


def render_dispatch(data: Mapping[str, Any], tail_lines: int = 20) -> str:
    """The page of one dispatch (`data` as `show --json` answers it)."""
    facts = [
        ("task", escape(data["task"])),
        ("status", _state(data["status"], data.get("waiting_for"))),
        ("params", f"<code>{escape(_json(data['params']))}</code>"),
        ("key", escape(data["key"] or "")),
        ("priority", str(data["priority"])),
        ("submitted", escape(_ts(data["created_at"]))),
        ("started", escape(_ts(data["started_at"]))),
        ("finished", escape(_ts(data["finished_at"]))),
    ]
    if data["error"]:
        facts.append(("error", f'<span class="error">{escape(data["error"])}</span>'))
    rows = "".join(f"<tr><th>{name}</th><td>{value}</td></tr>" for name, value in facts)
    body = f"""<p><a href="../">← status</a></p>
<h1>dispatch {data["id"]}</h1>
<section id="dispatch"><table>{rows}</table></section>
<h2>Steps</h2><section id="steps">{_steps(data)}</section>
<h2>Attempts</h2><section id="attempts">{_attempts(data["attempts"], tail_lines)}</section>"""
    final = DispatchStatus(data["status"]).is_final
    return _page(f"dispatch {data['id']}", body, refresh=not final)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def _steps(data: Mapping[str, Any]) -> str:
    running = {branch["step"] for branch in data.get("running") or ()}
    body = []
    for index, step in enumerate(data["plan"] or []):
        here = index == data["current_step"] and data["status"] not in ("succeeded",)
        mark = "▶" if step["name"] in running or (here and not running) else ""
        needs = step.get("needs")
        after = "(the one before)" if needs is None and index else ", ".join(needs or ())
        body.append(
            f'<tr class="step"><td>{mark}</td><td class="num">{index + 1}</td>'
            f"<td>{escape(step['name'])}</td><td>{escape(after)}</td>"
            f"<td>{escape(step['runner'])}</td>"
            f"<td><code>{escape(' '.join(step['args']))}</code></td></tr>"
        )
    head = "<tr><th></th><th>#</th><th>step</th><th>needs</th><th>runner</th><th>args</th></tr>"
    return _table(head, body, 6, "not planned yet")


def _attempts(attempts: Sequence[Mapping[str, Any]], tail_lines: int) -> str:
    body = []
    for attempt in attempts:
        code = "" if attempt["exit_code"] is None else str(attempt["exit_code"])
        output = attempt.get("output") or ""
        tail = "\n".join(output.rstrip("\n").splitlines()[-tail_lines:])
        shown = f'<pre class="tail">{escape(tail)}</pre>' if tail else ""
        error = f'<div class="error">{escape(attempt["error"])}</div>' if attempt["error"] else ""
        if attempt.get("result") is not None:
            result = _json(attempt["result"])[:ERROR_CHARS]
            error += f'<div class="result">result <code>{escape(result)}</code></div>'
        body.append(
            f'<tr class="attempt" data-status="{escape(attempt["status"])}">'
            f'<td>{escape(attempt["step"])}</td><td class="num">#{attempt["attempt"]}</td>'
            f'<td>{escape(attempt["status"])}</td><td class="num">{code}</td>'
            f"<td>{escape(_ts(attempt['started_at']))}</td>"
            f"<td>{escape(_ts(attempt['ended_at']))}</td><td>{error}{shown}</td></tr>"
        )
    head = (
        "<tr><th>step</th><th>attempt</th><th>status</th><th>exit</th><th>started</th>"
        "<th>ended</th><th>error and output (tail)</th></tr>"
    )
    return _table(head, body, 7, "no attempts yet")

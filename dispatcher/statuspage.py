"""The status page at `/`: server-rendered HTML, refreshed by the browser every few
seconds (`<meta http-equiv="refresh">`), no script. Every value is escaped."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from dispatcher.gate import GateState
from dispatcher.models import DispatchStatus

REFRESH_SECONDS = 2
ERROR_CHARS = 300


@dataclass(frozen=True, slots=True)
class RunningRow:
    """A dispatch this daemon works on now, and the step it is at."""

    id: int
    task: str
    status: str
    step: str | None
    started_at: datetime | None


@dataclass(frozen=True, slots=True)
class FailureRow:
    """A recently failed dispatch and why."""

    id: int
    task: str
    finished_at: datetime | None
    error: str | None


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


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em 2em; color: #1d2430;
       background: #f6f7f9; }
h1 { font-size: 1.4em; margin: 0 0 .2em; } h2 { font-size: 1.1em; margin: 1.4em 0 .5em; }
.meta { color: #5b6472; } .stopping { color: #b3261e; font-weight: 600; }
section { background: #fff; border: 1px solid #dde1e7; border-radius: 6px; padding: .6em 1em 1em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3em .6em; border-bottom: 1px solid #eceef2;
         vertical-align: top; }
th { color: #5b6472; font-weight: 600; }
.bar { background: #e6e9ee; border-radius: 4px; height: 14px; width: 260px; overflow: hidden; }
.fill { background: #2f7d4f; height: 100%; } .fill.full { background: #c2571a; }
.num { font-variant-numeric: tabular-nums; } .error { color: #b3261e; white-space: pre-wrap; }
.empty { color: #8a93a0; font-style: italic; }
.queue span { display: inline-block; margin-right: 1.5em; }
"""


def _ts(value: datetime | None) -> str:
    return "" if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def _ago(now: datetime, then: datetime | None) -> str:
    if then is None:
        return ""
    seconds = max(0, int((now - then).total_seconds()))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _gates(gates: Sequence[GateState]) -> str:
    rows = []
    for gate in gates:
        share = 0 if gate.capacity <= 0 else min(100, round(100 * gate.held / gate.capacity))
        full = " full" if gate.held >= gate.capacity else ""
        rows.append(
            f'<tr class="gate" data-gate="{escape(gate.name)}" data-held="{gate.held}" '
            f'data-capacity="{gate.capacity}"><td>{escape(gate.name)}</td>'
            f'<td><div class="bar"><div class="fill{full}" style="width:{share}%"></div></div></td>'
            f'<td class="num">{gate.held} / {gate.capacity}</td>'
            f'<td class="num">{gate.waiting}</td></tr>'
        )
    head = "<tr><th>gate</th><th>fill</th><th>held / capacity</th><th>waiting</th></tr>"
    return _table(head, rows, 4, "no gates")


def _queue(queue: Mapping[DispatchStatus, int]) -> str:
    items = "".join(
        f'<span class="status" data-status="{escape(str(status))}">{escape(str(status))}: '
        f'<b class="num">{queue.get(status, 0)}</b></span>'
        for status in DispatchStatus
    )
    return f'<div class="queue">{items}</div>'


def _running(now: datetime, rows: Sequence[RunningRow]) -> str:
    body = [
        f'<tr class="running" data-id="{row.id}"><td class="num">{row.id}</td>'
        f"<td>{escape(row.task)}</td><td>{escape(row.status)}</td>"
        f"<td>{escape(row.step or '')}</td><td>{escape(_ts(row.started_at))}</td>"
        f'<td class="num">{escape(_ago(now, row.started_at))}</td></tr>'
        for row in rows
    ]
    head = (
        "<tr><th>id</th><th>task</th><th>status</th><th>current step</th>"
        "<th>started</th><th>for</th></tr>"
    )
    return _table(head, body, 6, "nothing in flight")


def _failures(rows: Sequence[FailureRow]) -> str:
    body = []
    for row in rows:
        error = row.error or ""
        if len(error) > ERROR_CHARS:
            error = error[:ERROR_CHARS] + "…"
        body.append(
            f'<tr class="failure" data-id="{row.id}"><td class="num">{row.id}</td>'
            f"<td>{escape(row.task)}</td><td>{escape(_ts(row.finished_at))}</td>"
            f'<td class="error">{escape(error)}</td></tr>'
        )
    head = "<tr><th>id</th><th>task</th><th>failed at</th><th>error</th></tr>"
    return _table(head, body, 4, "no recent failures")


def _table(head: str, rows: list[str], columns: int, empty: str) -> str:
    if not rows:
        rows = [f'<tr><td colspan="{columns}" class="empty">{escape(empty)}</td></tr>']
    return f"<table><thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"


def render(view: StatusView) -> str:
    """The whole page."""
    state = '<span class="stopping">stopping (draining)</span>' if view.stopping else "serving"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>dispatcher {escape(view.instance_id)}</title><style>{_STYLE}</style></head>
<body>
<h1>dispatcher</h1>
<div class="meta">instance <b>{escape(view.instance_id)}</b> · version {escape(view.version)}
 · up {escape(_ago(view.now, view.started_at))} · {state} · {escape(_ts(view.now))}</div>
<h2>Gates</h2><section id="gates">{_gates(view.gates)}</section>
<h2>Queue</h2><section id="queue">{_queue(view.queue)}</section>
<h2>In flight</h2><section id="inflight">{_running(view.now, view.running)}</section>
<h2>Recent failures</h2><section id="failures">{_failures(view.failures)}</section>
</body></html>
"""

"""Views answer the JSON objects of the contracts: keys in order, optional keys only
when they say something."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

from dispatcher.models import DispatchStatus, Reservation, Step
from dispatcher.views import DispatchView, ReservationView

AT = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)


def test_a_reservation_says_retried_and_not_before_only_when_they_apply() -> None:
    plain = ReservationView.of(Reservation(7, DispatchStatus.QUEUED, True))
    assert json.dumps(plain.to_json()) == '{"id": 7, "status": "queued", "created": true}'
    later = ReservationView(7, DispatchStatus.QUEUED, False, retried=True, not_before=AT)
    assert json.dumps(later.to_json()) == (
        '{"id": 7, "status": "queued", "created": false, "retried": true, '
        '"not_before": "2026-01-02T03:04:05.678000Z"}'
    )


def test_a_listed_dispatch_has_no_attempts_and_a_shown_one_has_them() -> None:
    listed = DispatchView(
        id=1,
        task="t",
        status=DispatchStatus.RUNNING,
        waiting_for=None,
        params={"who": ["a"]},
        key=None,
        priority=0,
        plan=(Step("a", "noop", ("x",)),),
        current_step=0,
        error=None,
        created_at=AT,
        started_at=AT,
        finished_at=None,
        not_before=None,
        series=0,
        follows=None,
    )
    data = listed.to_json()
    assert list(data)[-2:] == ["series", "follows"]  # no attempts, no running
    assert data["plan"] == [Step("a", "noop", ("x",)).to_json()]
    assert (data["status"], data["created_at"]) == ("running", "2026-01-02T03:04:05.678000Z")
    assert type(data["status"]) is str  # the value, as the JSON contracts say
    shown = dataclasses.replace(listed, attempts=(), running=())
    assert list(shown.to_json())[-2:] == ["attempts", "running"]

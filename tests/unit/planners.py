"""Python planners used by the pipeline tests."""

from __future__ import annotations

from typing import Any


def good_plan(task: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "steps": [{"name": f"s{n}", "runner": "work", "args": [str(n)]} for n in range(params["n"])]
    }


def bad_plan(task: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "x", "runner": "gpu"}]


def graph_plan(task: str, params: dict[str, Any]) -> dict[str, Any]:
    return {
        "steps": [
            {"name": "fetch", "runner": "free"},
            {"name": "left", "runner": "free", "needs": ["fetch"]},
            {"name": "right", "runner": "free", "needs": ["fetch"]},
            {
                "name": "join",
                "runner": "free",
                "needs": ["left", "right"],
                "args": ["{steps.fetch.result}"],
            },
        ]
    }

"""The steps of a plan as a graph: who needs whom; pure functions.

A step's `needs` lists the steps that must succeed before it starts. A step without
`needs` needs the one before it (the first step: none), so a plan without any `needs`
runs in order, one step at a time, as plans always did. `needs = []` starts a step at
once.

A step may use the result of a step it depends on (directly or through others):
`{steps.NAME.result}`. Checking the graph refuses unknown names, cycles and results
taken from a step that is not sure to have finished first.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

Needs = Mapping[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Node:
    """What the graph check needs of a step."""

    name: str
    needs: tuple[str, ...] | None
    """None: the step before it."""
    uses: frozenset[str] = frozenset()
    """Steps whose results its args or kwargs use."""


def resolve_needs(nodes: Sequence[Node]) -> dict[str, tuple[str, ...]]:
    """Each step's needs, the implicit ones made explicit (in plan order)."""
    needs: dict[str, tuple[str, ...]] = {}
    for index, node in enumerate(nodes):
        if node.needs is not None:
            needs[node.name] = tuple(dict.fromkeys(node.needs))
        else:
            needs[node.name] = (nodes[index - 1].name,) if index else ()
    return needs


def check_graph(nodes: Sequence[Node]) -> None:
    """`ValueError` naming the step at fault: an unknown need, a cycle, or a result
    used from a step it does not depend on."""
    names = [node.name for node in nodes]
    known = set(names)
    for node in nodes:
        for need in node.needs or ():
            if need not in known:
                raise ValueError(
                    f"step {node.name!r} needs unknown step {need!r} (steps: {', '.join(names)})"
                )
    needs = resolve_needs(nodes)
    cycle = find_cycle(needs)
    if cycle:
        raise ValueError(f"steps form a cycle: {' -> '.join(cycle)}")
    before = ancestors(needs)
    for node in nodes:
        for used in sorted(node.uses):
            if used not in known:
                raise ValueError(
                    f"step {node.name!r} uses the result of unknown step {used!r} "
                    f"(steps: {', '.join(names)})"
                )
            if used not in before[node.name]:
                raise ValueError(
                    f"step {node.name!r} uses the result of step {used!r} but does not "
                    f"depend on it (add {used!r} to its needs)"
                )


def find_cycle(needs: Needs) -> list[str]:
    """One cycle as `[a, b, a]` (a needs b needs a), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in needs:
        if state.get(start):
            continue
        path = [start]
        stack = [iter(needs[start])]
        state[start] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(child) == 1:
                return [*path[path.index(child) :], child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append(iter(needs.get(child, ())))
    return []


def ancestors(needs: Needs) -> dict[str, frozenset[str]]:
    """Every step each one depends on, directly or through others (needs no cycle)."""
    found: dict[str, frozenset[str]] = {}

    def visit(name: str) -> frozenset[str]:
        if name not in found:
            direct = needs.get(name, ())
            found[name] = frozenset(direct).union(*(visit(need) for need in direct))
        return found[name]

    for name in topological(needs):
        visit(name)
    return found


def topological(needs: Needs) -> list[str]:
    """Step names, each after every step it needs (ties in plan order)."""
    order: list[str] = []
    placed: set[str] = set()
    remaining = list(needs)
    while remaining:
        progress = [name for name in remaining if set(needs[name]) <= placed]
        if not progress:
            raise ValueError(f"steps form a cycle: {' -> '.join(find_cycle(needs))}")
        for name in progress:
            order.append(name)
            placed.add(name)
        remaining = [name for name in remaining if name not in placed]
    return order


def ready(needs: Needs, done: Collection[str], started: Collection[str]) -> list[str]:
    """Steps not started whose needs have all succeeded, in plan order."""
    return [
        name
        for name, required in needs.items()
        if name not in done and name not in started and all(n in done for n in required)
    ]

"""Plans as graphs and result references: pure functions, config and planner checks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from dispatcher.config import Settings, describe_error, load_settings
from dispatcher.errors import ConfigError, PlanError
from dispatcher.graph import Node, ancestors, check_graph, find_cycle, ready, resolve_needs
from dispatcher.models import Step
from dispatcher.planners import steps_plan, validate_plan
from dispatcher.templating import (
    MissingResult,
    ResultRef,
    escape,
    fill,
    fill_params,
    fill_results,
    literal_with_refs,
    placeholders,
    template_fields,
)


def nodes(*specs: tuple[str, list[str] | None]) -> list[Node]:
    return [Node(name, None if needs is None else tuple(needs)) for name, needs in specs]


# -- the graph -------------------------------------------------------------------------------


def test_steps_without_needs_each_need_the_one_before() -> None:
    plan = nodes(("a", None), ("b", None), ("c", None))
    assert resolve_needs(plan) == {"a": (), "b": ("a",), "c": ("b",)}


def test_explicit_needs_make_branches_and_an_empty_list_starts_at_once() -> None:
    plan = nodes(("build", None), ("test", ["build"]), ("lint", ["build"]), ("solo", []))
    needs = resolve_needs(plan)
    assert ready(needs, done=set(), started=set()) == ["build", "solo"]
    assert ready(needs, done={"build"}, started={"solo"}) == ["test", "lint"]
    deploy = nodes(("deploy", ["test", "lint"]))
    assert ancestors({**needs, "deploy": ("test", "lint")})["deploy"] == {"build", "test", "lint"}
    assert resolve_needs([*plan, *deploy])["deploy"] == ("test", "lint")


def test_a_cycle_is_named_step_by_step() -> None:
    assert find_cycle({"a": ("c",), "b": ("a",), "c": ("b",)}) == ["a", "c", "b", "a"]
    with pytest.raises(ValueError, match=r"^steps form a cycle: a -> b -> a$"):
        check_graph(nodes(("a", ["b"]), ("b", None)))
    with pytest.raises(ValueError, match="cycle: a -> a"):
        check_graph(nodes(("a", ["a"])))


def test_unknown_needs_and_results_from_outside_the_ancestry_are_refused() -> None:
    with pytest.raises(ValueError, match=r"step 'b' needs unknown step 'x' \(steps: a, b\)"):
        check_graph(nodes(("a", None), ("b", ["x"])))
    lint_then_deploy = [Node("lint", ()), Node("test", ()), Node("deploy", ("test",), {"lint"})]
    with pytest.raises(ValueError, match="'deploy' uses the result of step 'lint' but does not"):
        check_graph(lint_then_deploy)
    with pytest.raises(ValueError, match="result of unknown step 'nope'"):
        check_graph([Node("a", None, frozenset({"nope"}))])
    check_graph([Node("a", None), Node("b", None), Node("c", None, frozenset({"a"}))])


def test_a_long_chain_is_checked_without_recursion_limits() -> None:
    chain = [Node(f"s{n}", None) for n in range(1000)]
    check_graph([*chain, Node("last", None, frozenset({"s0"}))])


# -- result references -------------------------------------------------------------------------


def test_templates_name_params_and_results_apart() -> None:
    names, refs = template_fields("{who} {steps.build.result} {steps.a.b.result.x.0} {{lit}}")
    assert names == ["who"]
    assert refs == [ResultRef("build"), ResultRef("a.b", ("x", "0"))]
    with pytest.raises(ValueError, match="only step args and kwargs may use a result"):
        placeholders("{steps.build.result}")
    for bad in ["{steps.build}", "{steps.build.result!r}", "{steps..result}", "{a.b}"]:
        with pytest.raises(ValueError, match="invalid placeholder"):
            template_fields(bad)


def test_results_fill_at_start_and_literal_braces_survive_both_fills() -> None:
    form = fill_params("{{x}} {p} {steps.build.result.path}", {"p": "{not a ref}"})
    assert form == "{{x}} {{not a ref}} {steps.build.result.path}"
    results = {"build": '{"path":"/out/app.tar","n":3}'}
    assert fill_results(form, results) == "{x} {not a ref} /out/app.tar"
    assert fill_results("{steps.build.result}", results) == '{"n":3,"path":"/out/app.tar"}'
    assert fill_results("{steps.build.result.n}", results) == "3"
    assert fill_results("{steps.l.result.1}", {"l": '["a","b"]'}) == "b"


@pytest.mark.parametrize(
    ("template", "results", "message"),
    [
        (
            "{steps.build.result.path}",
            {"build": '{"dir":"/out"}'},
            "{steps.build.result.path}: the result of step 'build' has no 'path' (it has: dir)",
        ),
        (
            "{steps.build.result.a.b}",
            {"build": '{"a":5}'},
            "{steps.build.result.a.b}: the result of step 'build' has no 'a.b' (it is 5)",
        ),
        (
            "{steps.build.result}",
            {"build": None},
            "{steps.build.result}: step 'build' gave no result",
        ),
    ],
)
def test_a_missing_result_is_one_clear_line(
    template: str, results: dict[str, str | None], message: str
) -> None:
    with pytest.raises(MissingResult) as caught:
        fill_results(template, results)
    assert str(caught.value) == message


# -- config and planner plans ------------------------------------------------------------------

RUNNERS = {"sh": {"type": "exec"}, "py": {"type": "python"}}


def settings(steps: list[dict[str, Any]]) -> Settings:
    return Settings.model_validate({"runners": RUNNERS, "tasks": {"ci": {"steps": steps}}})


CI = [
    {"name": "build", "runner": "sh", "args": ["make", "{version}"]},
    {"name": "test", "runner": "sh", "needs": ["build"]},
    {"name": "lint", "runner": "sh", "needs": ["build"], "on_failure": "cancel_siblings"},
    {
        "name": "deploy",
        "runner": "sh",
        "needs": ["test", "lint"],
        "args": ["deploy", "{steps.build.result.artifact}", "{version}"],
    },
]


def test_a_config_graph_becomes_a_plan_whose_result_users_wait_in_template_form() -> None:
    plan = steps_plan(settings(CI).tasks["ci"], {"version": "1.2"})
    assert [step.needs for step in plan] == [None, ("build",), ("build",), ("test", "lint")]
    assert plan[0].args == ("make", "1.2") and not plan[0].templated
    assert plan[2].on_failure == "cancel_siblings"
    assert plan[3].templated
    assert plan[3].args == ("deploy", "{steps.build.result.artifact}", "1.2")
    assert [Step.from_json(step.to_json()) for step in plan] == list(plan)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"needs": ["tset"]}, "tasks.ci: step 'deploy' needs unknown step 'tset' (steps: "),
        ({"needs": []}, "tasks.ci: step 'deploy' uses the result of step 'build' but does not"),
        ({"needs": ["deploy"]}, "tasks.ci: steps form a cycle: deploy -> deploy"),
        ({"on_failure": "ignore"}, "tasks.ci.steps[3].on_failure: Input should be "),
    ],
)
def test_check_config_refuses_bad_graphs_naming_the_step(
    change: dict[str, Any], message: str
) -> None:
    deploy = {**CI[3], **change}
    with pytest.raises(ValidationError) as caught:
        settings([*CI[:3], deploy])
    assert describe_error(caught.value)[1].startswith(message)


def test_a_planner_plan_may_use_needs_and_results_and_keeps_other_braces_literal() -> None:
    raw = [
        {"name": "build", "runner": "sh", "args": ['{"json": true}']},
        {"name": "deploy", "runner": "sh", "needs": ["build"], "args": ["{steps.build.result}"]},
        {"name": "notify", "runner": "py", "call": "m:f", "kwargs": {"a": "{steps.build.result}"}},
    ]
    plan = validate_plan(raw, settings(CI))
    assert plan[0].args == ('{"json": true}',) and not plan[0].templated
    assert plan[1].templated and plan[2].templated
    assert fill_results(plan[1].args[0], {"build": "7"}) == "7"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            [{"name": "a", "runner": "sh", "needs": ["b"]}, {"name": "b", "runner": "sh"}],
            "plan: steps form a cycle: a -> b -> a",
        ),
        (
            [{"name": "a", "runner": "sh"}, {"name": "b", "runner": "sh", "needs": ["zz"]}],
            "plan: step 'b' needs unknown step 'zz' (steps: a, b)",
        ),
        (
            [
                {"name": "a", "runner": "sh"},
                {"name": "b", "runner": "sh", "needs": [], "args": ["{steps.a.result}"]},
            ],
            "plan: step 'b' uses the result of step 'a' but does not depend on it "
            "(add 'a' to its needs)",
        ),
        (
            [{"name": "a", "runner": "sh", "on_failure": "x"}],
            "plan.steps[0].on_failure: Input should be 'finish_siblings' or 'cancel_siblings'",
        ),
    ],
)
def test_a_bad_planner_graph_is_a_plan_error(raw: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(PlanError) as caught:
        validate_plan(raw, settings(CI))
    assert str(caught.value).startswith(message)
    assert caught.value.exit_code == 65


def test_check_config_exits_78_with_one_line_for_a_cycle(tmp_path: Path) -> None:
    path = tmp_path / "dispatcher.toml"
    path.write_text(
        '[runners.sh]\ntype = "exec"\n[tasks.ci]\nsteps = [\n'
        '  { name = "a", runner = "sh", needs = ["b"] },\n'
        '  { name = "b", runner = "sh" },\n]\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(path, {})
    assert str(caught.value) == f"{path}: tasks.ci: steps form a cycle: a -> b -> a"
    assert caught.value.exit_code == 78


# -- properties of the two fills ------------------------------------------------------------

texts = st.text(alphabet="ab {}.$\\\"'", max_size=12)


@given(st.lists(st.tuples(texts, st.sampled_from(["x", "y"])), max_size=4), texts)
def test_template_form_fills_like_a_plain_fill_when_no_result_is_used(
    parts: list[tuple[str, str]], values: str
) -> None:
    """Params filled at plan time (values with braces included) come out unchanged
    after the fill at start, and so does every literal brace."""
    template = "".join(escape(text) + "{" + name + "}" for text, name in parts)
    params = {"x": values, "y": values[::-1]}
    assert fill_results(fill_params(template, params), {}) == fill(template, params)


@given(texts, texts)
def test_a_planner_arg_keeps_its_text_around_a_result_reference(before: str, after: str) -> None:
    text = before + "{steps.build.result.path}" + after
    assert fill_results(literal_with_refs(text), {"build": '{"path":"P"}'}) == before + "P" + after

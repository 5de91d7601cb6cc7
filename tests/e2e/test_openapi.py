"""The OpenAPI document stays true: schemathesis fuzzes the live daemon against it.

Every operation of `dispatcher/openapi.yaml` gets a bounded number of generated
requests, valid and invalid; each answer must match the documented status codes,
content types and schemas, and never be a 5xx. (schemathesis's pytest plugin does
not run on pytest 9, so its strategies are driven with hypothesis directly.)
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import Daemon
from .httphelp import api_config, api_url, call

pytestmark = pytest.mark.slow

SPEC = Path(str(resources.files("dispatcher").joinpath("openapi.yaml")))
SCHEMA = schemathesis.openapi.from_path(SPEC)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]
CASES = [
    pytest.param(op, mode, id=f"{op.label} {mode}")
    for op in OPERATIONS
    for mode in schemathesis.GenerationMode
    # an operation with no parameters and no body has no invalid request to make
    if mode is schemathesis.GenerationMode.POSITIVE or op.body or op.path_parameters
]
EXAMPLES = 20
CONFIG_DEPENDENT = {"POST /v1/dispatches"}
"""A schema-valid submission may still name a task (or lack a param) this daemon's
configuration does not know: 422 there is right, so "valid data is accepted" is not
checked for it. Its 201/200/409 answers are checked by tests/e2e/test_api.py."""


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp_path: Path = tmp_path_factory.mktemp("openapi")
    config = tmp_path / "dispatcher.toml"
    config.write_text(api_config(tmp_path, global_=2))
    daemon = Daemon(config, tmp_path)
    assert daemon.cli("init").returncode == 0
    # a few dispatches, so generated ids (hypothesis favours small ones) find real ones
    lines = [f'{{"task": "one", "params": {{"n": "{n}", "secs": "0"}}}}' for n in range(5)]
    assert daemon.cli("submit", "--batch", "-", stdin="\n".join(lines)).returncode == 0
    daemon.start()
    try:
        yield api_url(daemon)
        assert daemon.stop() == 0
    finally:
        daemon.close()


def test_the_daemon_serves_this_document(live_url: str) -> None:
    served = call("GET", f"{live_url}/openapi.yaml")
    assert served.status == 200
    assert served.body.decode() == SPEC.read_text()


@pytest.mark.parametrize(("operation", "mode"), CASES)
def test_answers_match_the_openapi_document(live_url: str, operation: Any, mode: Any) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        response = case.call(base_url=live_url)
        skipped = list(excluded)
        if response.status_code == 413:
            # Refused for its size before any field was read (documented): that is the
            # rejection of an invalid body too, though not one of the statuses
            # schemathesis counts as one.
            skipped.append(schemathesis.checks.negative_data_rejection)
        case.validate_response(response, excluded_checks=skipped)

    excluded = []
    if operation.label in CONFIG_DEPENDENT:
        excluded.append(schemathesis.checks.positive_data_acceptance)

    check()

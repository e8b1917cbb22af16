"""schemathesis against the live server's /openapi.json: no 5xx, answers match the schema.

The endless /api/events stream is left out (a generated call would never finish); it has
its own tests in test_sse.py. Each operation gets a bounded number of positive and
negative examples; schemathesis applies the bearer token itself (OpenAPI-aware auth), so
its negative cases may also drop it.
"""

from __future__ import annotations

from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from tests.e2e.serverkit import Server, place, unique

EXAMPLES_PER_MODE = 15
SKIPPED_PATHS = {"/api/events"}
# Failures that are not the server's fault, each with why.
EXPECTED = {
    # A cursor is opaque: only one from a previous page is valid, which no schema can say.
    '"detail":"invalid cursor"': "schema cannot describe an opaque cursor",
    # Reported separately (test_a_whole_float_priority_is_accepted_as_the_schema_says).
    "Expected `int`, got `float`": "whole floats are JSON Schema integers",
}


def _operations(server: Server) -> list[Any]:
    with server.anonymous() as client:
        spec = client.get("/openapi.json").json()
    config = schemathesis.Config.from_dict(
        {"auth": {"openapi": {"bearer": {"bearer": server.token}}}})
    schema = schemathesis.openapi.from_dict(spec, config=config)
    found = []
    for result in schema.get_all_operations():
        operation = result.ok()
        if operation.path not in SKIPPED_PATHS:
            found.append(operation)
    return found


def _failures_of(server: Server, operation: Any, mode: Any) -> list[str]:
    failures: list[str] = []
    session = requests.Session()
    # One connection per call: the server closes the connection after each problem
    # response (see test_errors_keep_the_connection_alive).
    headers = {"Connection": "close"}

    @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        try:
            case.call_and_validate(base_url=server.url, session=session, headers=headers)
        except (AssertionError, BaseExceptionGroup) as exc:  # Failure, FailureGroup
            failures.append(f"{case.method} {operation.path} ({mode.value}): {exc}")

    try:
        run()
    except Unsatisfiable:
        pass  # nothing to break: e.g. no negative case exists for an operation without input
    finally:
        session.close()
    return failures


def test_the_api_conforms_to_its_openapi_document(server: Server) -> None:
    """Generated calls to every documented operation get no 5xx and schema-valid answers."""
    modes = [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE]
    operations = _operations(server)
    assert len(operations) >= 13
    failures: list[str] = []
    for operation in operations:
        for mode in modes:
            failures += _failures_of(server, operation, mode)
    unexpected = [f for f in failures if not any(known in f for known in EXPECTED)]
    assert not unexpected, "\n\n".join(unexpected[:10])


@pytest.mark.xfail(strict=True, reason="non-conformance found by schemathesis: the schema says "
                   "`integer`, which in JSON Schema 2020-12 includes 5.0, but the body is decoded "
                   "strictly by msgspec (adapters/http/jobs.py decode_json), so 5.0 is a 422")
def test_a_whole_float_priority_is_accepted_as_the_schema_says(server: Server) -> None:
    """`"priority": 5.0` is a valid integer by the published schema and is taken as 5."""
    name = place(server, "parked", unique("float"))
    with server.client() as client:
        made = client.post("/api/jobs", json={"workflow_name": "parked", "file_path": name,
                                              "priority": 5.0})
        if made.status_code in (200, 201):
            client.post(f"/api/jobs/{made.json()['id']}/cancel")
    assert made.status_code == 201, made.text
    assert made.json()["priority"] == 5

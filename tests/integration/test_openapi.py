"""The HTTP API as its OpenAPI document describes it, fuzzed with schemathesis: no 500s."""

from __future__ import annotations

import json
import urllib.request

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from chatnode.openapi import document
from tests.integration.harness import NodeProc
from tests.integration.test_fuzz import make_user

schema = schemathesis.openapi.from_dict(document())


def test_openapi_json_is_served_and_matches(isolated: NodeProc) -> None:
    with urllib.request.urlopen(isolated.http + "/openapi.json", timeout=10) as resp:
        served = json.loads(resp.read())
    assert served == document()
    assert set(served["paths"]) >= {"/auth/signup", "/auth/login", "/profile/lastseen"}


@schema.parametrize()
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case: schemathesis.Case, isolated: NodeProc) -> None:
    fresh = make_user(isolated.http)[1]  # logout may revoke it: one token per case
    case.call_and_validate(
        base_url=isolated.http,
        headers={"Authorization": f"Bearer {fresh}"},
        checks=[not_a_server_error],
    )

"""Property-based API testing of the live gateway with schemathesis.

The gateway runs for real (uvicorn on a loopback port, embedded ONNX Runtime backend, the toy
contract model) with inspection and admin keys configured; schemathesis reads its OpenAPI
document over HTTP and sends generated requests (valid and invalid paths, bodies, headers) to
every operation, admin ones included (sent with the admin key, so they reach their handlers).
No request may get a 5xx: bad input must be a 4xx with the gateway's error shape.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from onnx_fixtures import make_card, write_contract_model  # noqa: E402
from slsg.contract import model_path  # noqa: E402
from slsg_gateway.app import create_app  # noqa: E402
from slsg_gateway.server import BackgroundGateway  # noqa: E402
from slsg_gateway.settings import Settings  # noqa: E402

pytestmark = pytest.mark.slow
INSPECT_KEY, ADMIN_KEY = "inspect-secret", "admin-secret"
EXAMPLES_PER_OPERATION = 25


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory):
    outside: Path = tmp_path_factory.mktemp("schema")
    root = outside / "model_repository"
    write_contract_model(model_path(root, "toy", 1), make_card("toy", size=32))
    write_contract_model(model_path(root, "toy", 2), make_card("toy", size=32, top_k=4))  # loads may pin v1
    write_contract_model(model_path(root, "spare", 1), make_card("spare", size=32))  # the one unload may hit
    # a "version" next to the repository, where a model named '..' would find it
    write_contract_model(outside / "1" / "model.onnx", make_card("toy", size=32))
    # small limits, so generated bodies also reach the 413 and too-many-files paths
    config = Settings(repository=root, port=0, api_keys=[INSPECT_KEY], admin_keys=[ADMIN_KEY], lines=["line-1"],
                      max_body_bytes=200_000, max_pixels=1_000_000, max_batch_files=4, batch_window_ms=1)
    with BackgroundGateway(config) as gw:
        yield gw


@pytest.fixture(scope="module")
def live_schema(gateway):
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


# Operations, one test each (the schemathesis pytest plugin's lazy loader does not run on pytest 9)
OPERATIONS = [(method.upper(), path) for path, methods in create_app(Settings()).openapi()["paths"].items()
              for method in methods]


def test_live_schema_lists_the_expected_operations(live_schema) -> None:
    live = {(op.ok().method.upper(), op.ok().path) for op in live_schema.get_all_operations()}
    assert live == set(OPERATIONS) and len(live) >= 8


@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_no_operation_answers_with_a_server_error(live_schema, gateway, method: str, path: str) -> None:
    operation = live_schema[path][method]
    # valid and deliberately invalid requests; the admin key is valid everywhere, so they pass authentication
    strategies = [operation.as_strategy(mode) for mode in GenerationMode]
    if "{name}" in path:  # generated names are unknown models: also aim at a served one to reach the handlers
        served = "spare" if path.endswith("/unload") else "toy"  # an unloaded toy would make later 503s legitimate
        strategies += [operation.as_strategy(mode, path_parameters={"name": served}) for mode in GenerationMode]
    cases = st.one_of(strategies)

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def no_server_error(case) -> None:
        case.call_and_validate(base_url=gateway.url, headers={"X-API-Key": ADMIN_KEY},
                               checks=[not_a_server_error], timeout=30)

    no_server_error()


BODIES = {"inspect": {"content": b"\x89PNG", "headers": {"Content-Type": "image/png"}},
          "inspect:batch": {"files": {"files": ("a.png", b"\x89PNG", "image/png")}}, "load": {}, "unload": {}}


@pytest.mark.parametrize("name", ["x" * 300, "%2E%2E"])  # the second reaches the gateway as '..'
@pytest.mark.parametrize("operation", sorted(BODIES))
def test_names_the_file_system_rejects_are_unknown_models(gateway, name: str, operation: str) -> None:
    # found by the schemathesis run: a 300-character name made os.stat fail (500); '..' probed outside the repository
    kwargs = BODIES[operation]
    headers = {"X-API-Key": ADMIN_KEY, **kwargs.get("headers", {})}
    r = httpx.post(f"{gateway.url}/v1/models/{name}/{operation}", headers=headers, timeout=30,
                   **{k: v for k, v in kwargs.items() if k != "headers"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", r.text

"""Fitting the router's classifier through the admin API: labelled prompts in, a new stored
version in force at once, its figures out; dry runs; refusals; and a restarted gateway (or a
second one on the same store) serving the stored version without fitting again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from adapters.store import ROUTER_DIR
from service.router_store import RouterStore
from service.settings import Settings
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    AUTH,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    running_gateway,
    settings_fixture,
    store_dir_fixture,
)
from tests.api.conftest import assert_error
from tests.api.test_router import BANKING, COOKING, EGG, EXPLAIN, SMALL_TALK, TRANSFER, adapters, settle
from tests.fakes import FakeEngine

assert adapters  # the fixture, imported under its pytest name
FIT = "/admin/router/fit"
LABELLED = [
    {"text": "Send 50 euros to my brother's account", "label": "banking"},
    {"text": "Why was my debit card declined?", "label": "banking"},
    {"text": "How do I caramelise onions?", "label": "cooking"},
    {"text": "Can I freeze cooked rice?", "label": "cooking"},
    {"text": "Tell me a joke about penguins", "label": "base"},
    {"text": "Who wrote Pride and Prejudice?", "label": "base"},
]


async def route_of(client: httpx.AsyncClient, prompt: str) -> dict[str, Any]:
    body = {"model": "auto", "rag": "off", "messages": [{"role": "user", "content": prompt}]}
    response = await client.post(EXPLAIN, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    route: dict[str, Any] = response.json()["route"]
    return route


async def test_a_fit_is_stored_as_a_new_version_and_in_force_at_once(
    client: httpx.AsyncClient, adapters: None, store_dir: Path
) -> None:
    response = await client.post(FIT, json={"examples": LABELLED}, headers=AUTH)
    assert response.status_code == 200, response.text
    fitted = response.json()
    assert fitted["object"] == "router.fit"
    assert fitted["stored"] is True
    assert fitted["version"] == 2  # version 1: the fit that followed the registrations
    assert fitted["classes"] == ["banking", "cooking", "base"]
    assert fitted["data"]["banking"] == {"example": 3, "description": 1, "fit": 2}
    assert fitted["data"]["base"]["fit"] == 2
    assert fitted["fit_rows"] == len(LABELLED)
    assert fitted["validation"]["folds"] == 5

    shown = (await client.get("/admin/router", headers=AUTH)).json()["classifier"]
    assert shown["version"] == 2
    assert "router v2" in (await route_of(client, TRANSFER))["reason"]
    stored = RouterStore(store_dir / ROUTER_DIR).current()
    assert stored is not None
    assert stored.version == 2
    assert [{"text": t, "label": label} for t, label in stored.fit_rows] == LABELLED


async def test_a_dry_run_reports_and_stores_nothing(
    client: httpx.AsyncClient, adapters: None, store_dir: Path
) -> None:
    response = await client.post(FIT, json={"examples": LABELLED, "dry_run": True}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["stored"] is False
    assert response.json()["version"] is None
    assert RouterStore(store_dir / ROUTER_DIR).current_version() == 1
    assert "router v1" in (await route_of(client, TRANSFER))["reason"]


async def test_labelled_prompts_survive_an_adapter_change(
    app: FastAPI, client: httpx.AsyncClient, adapters: None
) -> None:
    assert (await client.post(FIT, json={"examples": LABELLED}, headers=AUTH)).status_code == 200
    response = await client.patch(
        "/admin/adapters/cooking", json={"examples": [*COOKING, "Pair a wine with fish"]}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    await settle(app)
    classifier = (await client.get("/admin/router", headers=AUTH)).json()["classifier"]
    assert classifier["version"] == 3
    assert classifier["fit_rows"] == len(LABELLED)
    assert classifier["data"]["cooking"] == {"example": 4, "description": 1, "fit": 2}


async def test_deleting_an_adapter_takes_it_out_of_the_classifier(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    assert (await client.delete("/admin/adapters/banking", headers=AUTH)).status_code == 204
    # Until the refit lands the deleted adapter is never chosen; after it, it is gone.
    assert (await route_of(client, TRANSFER))["adapter"] is None
    await settle(app)
    classifier = (await client.get("/admin/router", headers=AUTH)).json()["classifier"]
    assert classifier["classes"] == ["cooking", "base"]
    assert (await route_of(client, EGG))["adapter"] == "cooking"


async def test_a_restarted_gateway_serves_the_stored_version_without_fitting(
    settings: Settings, engine: FakeEngine, tmp_path: Path, client: httpx.AsyncClient, adapters: None
) -> None:
    assert (await client.post(FIT, json={"examples": LABELLED}, headers=AUTH)).status_code == 200
    # A second gateway on the same data directory: a restart, or another host on shared storage.
    async with running_gateway(settings, engine, tmp_path) as (other, other_client):
        router = other.state.router
        assert router.learner.active is not None
        assert router.learner.active.version == 2  # loaded, before anything asked for it
        await settle(other)
        classifier = (await other_client.get("/admin/router", headers=AUTH)).json()["classifier"]
        assert classifier["version"] == 2  # same inputs: not fitted again
        assert (await route_of(other_client, TRANSFER))["adapter"] == "banking"
        assert (await route_of(other_client, SMALL_TALK))["adapter"] is None


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"examples": [{"text": "hi", "label": "nobody"}]}, "examples[0].label", "unknown_label"),
        ({"examples": [{"text": " ", "label": "base"}]}, "examples.0.text", None),
        ({"examples": [{"text": "hi"}]}, "examples.0.label", None),
        ({"examples": "hi"}, "examples", None),
        ({"examples": [], "extra": 1}, "extra", None),
    ],
)
async def test_bad_labelled_prompts_are_400_and_change_nothing(
    client: httpx.AsyncClient, adapters: None, body: dict[str, Any], param: str, code: str | None
) -> None:
    response = await client.post(FIT, json=body, headers=AUTH)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == code
    if code is not None:
        assert_error(response, 400, param=param, code=code)
    classifier = (await client.get("/admin/router", headers=AUTH)).json()["classifier"]
    assert classifier["version"] == 1


async def test_fitting_with_no_adapter_prompts_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(FIT, json={"examples": [{"text": "hello", "label": "base"}]}, headers=AUTH)
    assert_error(response, 400, param="examples", code="nothing_to_fit")


async def test_the_fit_needs_the_admin_token(client: httpx.AsyncClient) -> None:
    response = await client.post(FIT, json={"examples": []})
    assert response.status_code == 401
    assert BANKING  # the module's prompts are the router tests'

"""``GET /v1/models/{model}``: each card of the list, the same one, by id; any other id a 404 in
OpenAI's envelope."""

from __future__ import annotations

import httpx
import pytest

from service.adapter_registry import AdapterRegistry
from service.settings import Settings
from tests.api.conftest import assert_error, make_settings
from tests.fakes import Drop, FakeEngine
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import BASE_MODEL, model_card


@pytest.fixture(autouse=True)
def registered_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    """One adapter the gateway serves, as the registry reports it once registered."""
    monkeypatch.setattr(AdapterRegistry, "servable", lambda self: ["poet"])


async def test_every_listed_card_is_retrieved_as_listed(client: httpx.AsyncClient) -> None:
    listed = (await client.get("/v1/models")).json()["data"]
    assert [card["id"] for card in listed] == [BASE_MODEL, "poet", "auto"]
    for card in listed:
        response = await client.get(f"/v1/models/{card['id']}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json() == card
        assert_conforms("Model", response.json())


async def test_the_adapter_card_names_its_parent(client: httpx.AsyncClient) -> None:
    card = (await client.get("/v1/models/poet")).json()
    assert card["parent"] == BASE_MODEL
    assert "root" not in card


@pytest.mark.parametrize("model", ["gpt-4o", "AUTO", "tiny-base ", "pirate-lora", "all-MiniLM-L6-v2"])
async def test_an_unknown_id_is_404(client: httpx.AsyncClient, engine: FakeEngine, model: str) -> None:
    # pirate-lora: an adapter the engine holds that the gateway never registered, so not servable
    engine.models = [model_card(), model_card("pirate-lora", parent=BASE_MODEL)]
    response = await client.get(f"/v1/models/{model}")
    error = assert_error(response, 404, param="model", code="model_not_found")
    assert model in error["message"]


async def test_an_empty_id_is_an_unknown_route(client: httpx.AsyncClient) -> None:
    # "/v1/models/" is not normalised to the list (see test_route_auth), nor read as an id
    assert_error(await client.get("/v1/models/"), 404, param=None)


async def test_the_engine_down_is_503(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.models_error = Drop()
    response = await client.get(f"/v1/models/{BASE_MODEL}")
    assert_error(response, 503, param=None, code="engine_unavailable")


class TestApiKeys:
    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(api_keys="key-one-0123456789")

    async def test_the_api_key_is_required(self, client: httpx.AsyncClient) -> None:
        refused = await client.get("/v1/models/auto")
        assert_error(refused, 401, param=None, code="invalid_api_key", error_type="authentication_error")
        headers = {"Authorization": "Bearer key-one-0123456789"}
        assert (await client.get("/v1/models/auto", headers=headers)).status_code == 200

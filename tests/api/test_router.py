"""The router behind ``model: auto``, with real adapters, the real embedder and index, and a
fake engine: which adapter answers, when retrieved passages are added, the overrides, the
``route`` the client is told, the admin API that shows, explains and tunes it, and the fallback
when the index fails."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from index.errors import IndexUnavailable
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    AUTH,
    BASE_ID,
    assert_admin_error,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    settings_fixture,
    store_dir_fixture,
    upload,
)
from tests.api.conftest import CHAT, assert_error, chat_body, sse_json
from tests.api.test_admin_collections import PASSWORDS, REFUNDS, doc, ingested
from tests.fakes import FakeEngine
from tests.openai_schema import assert_conforms
from tests.vllm_bodies import stream_chunks

BANKING = [
    "How do I transfer money to another account?",
    "What is my checking account balance?",
    "Freeze my debit card, it was stolen",
]
COOKING = [
    "How long should I boil an egg?",
    "Give me a recipe for lasagna",
    "What can I substitute for butter in baking?",
]
RATES = (
    "Today's exchange rate: one euro buys 1.0825 US dollars; "
    "wire transfers sent before noon settle the same day."
)

TRANSFER = "Please transfer 200 dollars from my savings account to checking."
EGG = "How long should I boil an egg for a runny yolk?"
SMALL_TALK = "Hi! How are you doing today?"
REFUND_QUESTION = "How long does a refund take to reach my card?"
RATE_QUESTION = "What is the euro to dollar exchange rate today for a wire transfer?"
EXPLAIN = "/admin/router/explain"


async def settle(app: FastAPI) -> None:
    """Wait until the router's classifier has caught up with the adapters (it is refitted in
    the background after every change)."""
    await app.state.router.sync()
    await app.state.router.learner.settled()


@pytest.fixture
async def adapters(
    app: FastAPI, client: httpx.AsyncClient, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    """Two adapters with example prompts: banking and cooking; the router fitted on them."""
    for name, adapter, examples, description in (
        ("banking", lora_adapter, BANKING, "Banking: transfers, balances, cards and accounts"),
        ("cooking", other_lora_adapter, COOKING, "Cooking: recipes, ingredients and kitchen techniques"),
    ):
        response = await upload(client, name, adapter, description=description, examples=json.dumps(examples))
        assert response.status_code == 201, response.text
    await settle(app)


@pytest.fixture
async def handbook(client: httpx.AsyncClient) -> None:
    """A stable collection (refunds, passwords)."""
    await ingested(client, "handbook", doc("refunds.md", REFUNDS), doc("security.md", PASSWORDS))


@pytest.fixture
async def rates(client: httpx.AsyncClient) -> None:
    """A volatile collection: knowledge no adapter can have been trained on."""
    await ingested(client, "rates", doc("rates/today.md", RATES), volatile=True)


async def routed(client: httpx.AsyncClient, engine: FakeEngine, prompt: str, **fields: Any) -> dict[str, Any]:
    """Chat ``prompt`` (``model: auto`` unless ``fields`` say otherwise); the ``route`` it got,
    checked against the model the engine was asked for and the ``X-Route`` header."""
    engine.enqueue_completion()
    response = await client.post(
        CHAT, json=chat_body(messages=[{"role": "user", "content": prompt}], **fields)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    route: dict[str, Any] = body["route"]
    assert engine.last_chat_body["model"] == (route["adapter"] or BASE_ID)
    rag = "on" if route["rag"]["used"] else "off"
    sources = len(route["rag"]["sources"])
    assert (
        response.headers["x-route"] == f"adapter={route['adapter'] or 'none'}; rag={rag}; sources={sources}"
    )
    return route


def sources_of(route: dict[str, Any]) -> list[str]:
    return [source["source"] for source in route["rag"]["sources"]]


# ---------------------------------------------------------------------------- the domain signal


async def test_a_domain_prompt_goes_to_its_adapter(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    route = await routed(client, engine, TRANSFER)
    assert route["adapter"] == "banking"
    scores = route["scores"]["adapters"]
    assert set(scores) == {"banking", "cooking"}
    # Calibrated probabilities: the adapter's reaches the abstain threshold, the other's is nil.
    assert scores["banking"] >= 0.9 > 0.05 > scores["cooking"]
    assert 0 <= route["scores"]["base"] < 0.1
    assert route["reason"].startswith("adapter 'banking': probability")
    assert "router v1" in route["reason"]

    assert (await routed(client, engine, EGG))["adapter"] == "cooking"


async def test_small_talk_goes_to_the_base_model_and_says_why(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    route = await routed(client, engine, SMALL_TALK)
    assert route["adapter"] is None
    assert route["rag"] == {"used": False, "sources": []}
    assert route["scores"]["base"] > 0.9 > 0.05 > max(route["scores"]["adapters"].values())
    assert route["reason"].startswith("base model: best adapter")


async def test_before_the_first_fit_the_reason_says_whether_one_is_coming(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, lora_adapter: Path
) -> None:
    learner = app.state.router.learner
    # Holding the learner's lock keeps every refresh in flight, so what each request is told
    # does not depend on how fast the background fit is.
    async with learner._lock:
        # The start's refresh, with no adapter at all. The gateway's own follower may have run
        # it already, its fit done before the lock was taken: forgetting what was seen makes
        # this one start a refit, held by the lock, whichever came first.
        app.state.router._seen = -1
        await app.state.router.sync()
        assert learner.fitting
        route = await routed(client, engine, TRANSFER)
        assert route["reason"].startswith("base model: no adapter has example prompts")

        response = await upload(client, "banking", lora_adapter, examples=json.dumps(BANKING))
        assert response.status_code == 201, response.text
        route = await routed(client, engine, TRANSFER)
        assert route["adapter"] is None
        assert route["reason"].startswith("base model: the router is being fitted")
    await settle(app)
    assert (await routed(client, engine, TRANSFER))["adapter"] == "banking"


async def test_a_short_follow_up_is_routed_with_the_question_before_it(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    messages = [
        {"role": "user", "content": TRANSFER},
        {"role": "assistant", "content": "Done."},
        {"role": "user", "content": "And tomorrow?"},
    ]
    engine.enqueue_completion()
    response = await client.post(CHAT, json=chat_body(messages=messages))
    assert response.status_code == 200, response.text
    assert response.json()["route"]["adapter"] == "banking"


async def test_naming_an_adapter_or_the_base_model_pins_it(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    pinned = await routed(client, engine, TRANSFER, model="cooking")
    assert pinned["adapter"] == "cooking"
    assert pinned["reason"].startswith("model names adapter 'cooking'")
    assert pinned["scores"]["adapters"]["banking"] > pinned["scores"]["adapters"]["cooking"]

    base = await routed(client, engine, TRANSFER, model=BASE_ID)
    assert base["adapter"] is None
    assert base["reason"].startswith("model names the base model")


async def test_a_fitted_threshold_takes_effect_at_once(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    # An adapter's own threshold is the probability it needs, in place of the fitted one.
    response = await client.patch("/admin/adapters/banking", json={"threshold": 1.0}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] == 1.0
    route = await routed(client, engine, TRANSFER)
    assert route["adapter"] is None
    assert "< 1.00" in route["reason"]

    response = await client.patch("/admin/adapters/banking", json={"threshold": None}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["threshold"] is None
    assert (await routed(client, engine, TRANSFER))["adapter"] == "banking"


async def test_a_route_stream_carries_the_decision_on_its_first_chunk(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    engine.enqueue_stream(stream_chunks("Sure", "."))
    body = chat_body(messages=[{"role": "user", "content": TRANSFER}], stream=True)
    async with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["x-route"] == "adapter=banking; rag=off; sources=0"
        await response.aread()
    chunks, _ = sse_json(response)
    assert chunks[0]["route"]["adapter"] == "banking"
    assert all("route" not in chunk for chunk in chunks[1:])


# ---------------------------------------------------------------------------- the knowledge signal


async def test_a_question_only_the_documents_answer_gets_them(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None
) -> None:
    # A refund question is banking traffic to the router: pinned to the base model, retrieval
    # is still decided by the knowledge signal.
    route = await routed(client, engine, REFUND_QUESTION, model=BASE_ID)
    assert route["adapter"] is None
    assert route["rag"]["used"] is True
    assert sources_of(route) == ["refunds.md"]  # the passwords passage is below the threshold
    assert route["scores"]["retrieval"] >= 0.45
    assert "1 passages >= threshold 0.45" in route["reason"]
    system = engine.last_chat_body["messages"][0]
    assert system["role"] == "system"
    assert REFUNDS in system["content"]


async def test_an_unrelated_question_gets_no_documents(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None
) -> None:
    route = await routed(client, engine, SMALL_TALK)
    assert route["rag"] == {"used": False, "sources": []}
    assert route["scores"]["retrieval"] < 0.45
    assert "no retrieval: best passage" in route["reason"]
    assert engine.last_chat_body["messages"] == [{"role": "user", "content": SMALL_TALK}]


async def test_an_adapter_gets_volatile_passages_only(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None, rates: None
) -> None:
    stable = await routed(client, engine, REFUND_QUESTION, model="banking")
    assert stable["rag"]["used"] is False
    assert stable["scores"]["retrieval"] >= 0.45
    assert "only stable collections matched" in stable["reason"]

    fresh = await routed(client, engine, RATE_QUESTION, model="banking")
    assert fresh["adapter"] == "banking"
    assert sources_of(fresh) == ["rates/today.md"]
    assert fresh["rag"]["sources"][0]["volatile"] is True
    assert "volatile" in fresh["reason"]


async def test_rag_on_and_off_override_the_knowledge_signal(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None
) -> None:
    off = await routed(client, engine, REFUND_QUESTION, rag="off")
    assert off["rag"]["used"] is False
    assert off["scores"]["retrieval"] is None
    assert "rag=off" in off["reason"]

    on = await routed(client, engine, SMALL_TALK, rag="on")
    assert set(sources_of(on)) == {"refunds.md", "security.md"}  # whatever their scores
    assert "rag=on" in on["reason"]


async def test_an_adapter_that_forbids_retrieval_never_gets_passages(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, rates: None
) -> None:
    response = await client.patch("/admin/adapters/banking", json={"allow_retrieval": False}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["allow_retrieval"] is False

    route = await routed(client, engine, RATE_QUESTION, model="banking")
    assert route["rag"]["used"] is False
    assert "adapter 'banking' forbids it" in route["reason"]

    # Forcing retrieval: a pinned adapter cannot have it, and auto will not pick the adapter.
    engine_requests = len(engine.requests)
    refused = await client.post(
        CHAT, json=chat_body(model="banking", rag="on", messages=[{"role": "user", "content": TRANSFER}])
    )
    assert_error(refused, 400, param="rag", code="retrieval_forbidden")
    assert len(engine.requests) == engine_requests
    forced = await routed(client, engine, TRANSFER, rag="on")
    assert forced["adapter"] is None
    assert forced["rag"]["used"] is True


# ---------------------------------------------------------------------------- failures


async def test_an_index_failure_falls_back_to_the_base_model(
    app: FastAPI,
    client: httpx.AsyncClient,
    engine: FakeEngine,
    adapters: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise IndexUnavailable("chromadb at http://chroma:8000 is unreachable")

    monkeypatch.setattr(app.state.knowledge.retriever, "search", unavailable)
    route = await routed(client, engine, TRANSFER)
    assert route["adapter"] is None
    assert route["rag"]["used"] is False
    assert route["reason"].startswith("router failed (index unavailable: chromadb at")
    assert route["reason"].endswith("base model, no retrieval")

    # Retrieval was required: the client hears that the index is down.
    response = await client.post(CHAT, json=chat_body(rag="on"))
    assert_error(response, 503, param=None, code="index_unavailable")


# ---------------------------------------------------------------------------- admin: show, explain, update


async def test_the_router_configuration_shows_the_classifier_and_every_adapter(
    app: FastAPI, client: httpx.AsyncClient, adapters: None
) -> None:
    await client.patch("/admin/adapters/cooking", json={"threshold": 0.5}, headers=AUTH)
    await settle(app)
    response = await client.get("/admin/router", headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "router"
    assert body["rag_threshold"] == 0.45
    assert body["fitting"] is False
    classifier = body["classifier"]
    # A threshold is not a routing input: the version fitted for the two adapters stands.
    assert classifier["version"] == 1
    assert classifier["classes"] == ["banking", "cooking", "base"]
    assert classifier["data"]["banking"] == {"example": 3, "description": 1}
    assert classifier["data"]["base"]["general"] > 300
    assert 0 < classifier["abstain_threshold"] < 1
    validation = classifier["validation"]
    assert validation["folds"] == 5
    assert validation["base_recall"] >= 0.95
    assert set(validation) == {
        "in_domain_accuracy",
        "base_recall",
        "macro_f1",
        "calibration_error",
        "rows",
        "folds",
    }
    by_name = {entry["name"]: entry for entry in body["adapters"]}
    assert by_name["banking"] == {
        "name": "banking",
        "threshold": None,
        "routed": True,
        "allow_retrieval": True,
        "servable": True,
    }
    assert by_name["cooking"]["threshold"] == 0.5


async def test_explain_returns_the_route_without_generating(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None
) -> None:
    chat_route = await routed(client, engine, REFUND_QUESTION, model=BASE_ID)
    before = len(engine.requests)
    body = chat_body(messages=[{"role": "user", "content": REFUND_QUESTION}], model=BASE_ID)
    response = await client.post(EXPLAIN, json=body, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"route": chat_route}
    assert [r.path for r in engine.requests[before:]] == ["/tokenize"]  # fitting the sources, no chat


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "rag": "sometimes"}, "rag"),
        ({"messages": [{"role": "user", "content": "x"}], "model": "no-such-model"}, "model"),
    ],
)
async def test_explain_refuses_what_chat_refuses(
    client: httpx.AsyncClient, adapters: None, body: dict[str, Any], param: str
) -> None:
    response = await client.post(EXPLAIN, json=body, headers=AUTH)
    assert response.status_code in {400, 404}
    assert response.json()["error"]["param"] == param


async def test_the_router_admin_api_needs_the_token(client: httpx.AsyncClient) -> None:
    assert_admin_error(await client.get("/admin/router"), 401, param=None, code="missing_admin_token")
    assert_admin_error(
        await client.post(EXPLAIN, json=chat_body(), headers={"Authorization": "Bearer wrong"}),
        401,
        param=None,
        code="invalid_admin_token",
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"threshold": 1.5}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"examples": "one"}, "examples"),
        ({"allow_retrieval": "no"}, "allow_retrieval"),
        ({"rank": 4}, "rank"),
    ],
)
async def test_an_invalid_update_is_400_and_changes_nothing(
    client: httpx.AsyncClient, adapters: None, body: dict[str, Any], param: str
) -> None:
    before = (await client.get("/admin/adapters/banking", headers=AUTH)).json()
    response = await client.patch("/admin/adapters/banking", json=body, headers=AUTH)
    assert_error(response, 400, param=param, code=None)
    assert (await client.get("/admin/adapters/banking", headers=AUTH)).json() == before


async def test_updating_an_unknown_adapter_is_404(client: httpx.AsyncClient) -> None:
    response = await client.patch("/admin/adapters/nobody", json={"threshold": 0.5}, headers=AUTH)
    assert_error(response, 404, param="name", code="adapter_not_found")


async def test_new_examples_refit_the_router(
    app: FastAPI, client: httpx.AsyncClient, engine: FakeEngine, adapters: None
) -> None:
    question = "Which wine goes well with grilled salmon?"
    before = await routed(client, engine, question)
    response = await client.patch(
        "/admin/adapters/cooking",
        json={"examples": [*COOKING, "What wine should I serve with fish?", "Pair a red wine with steak"]},
        headers=AUTH,
    )
    assert response.status_code == 200, response.text
    await settle(app)
    after = await routed(client, engine, question)
    assert after["adapter"] == "cooking"
    assert after["scores"]["adapters"]["cooking"] > before["scores"]["adapters"]["cooking"]
    assert "router v2" in after["reason"]


async def test_routes_are_counted_by_kind_and_adapter(
    client: httpx.AsyncClient, engine: FakeEngine, adapters: None, handbook: None
) -> None:
    await routed(client, engine, TRANSFER)
    await routed(client, engine, TRANSFER)
    await routed(client, engine, REFUND_QUESTION, model=BASE_ID)
    metrics = (await client.get("/metrics")).text
    assert 'hybrid_routes_total{adapter="banking",kind="adapter"} 2.0' in metrics
    assert 'hybrid_routes_total{adapter="",kind="base+rag"} 1.0' in metrics

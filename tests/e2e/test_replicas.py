"""Many replicas, the way deploy/ runs them: two real vLLM CPU engines with the filesystem LoRA
resolver on one adapter store, vLLM's router (``vllm-router`` from PyPI) in front, and the
gateway pointed at the router with ``HYBRID_LORA_RESOLVER`` and API keys. An adapter registered
once is served by both replicas; with one replica stopped, the service keeps answering.

The fleet starts once for this module (about two minutes: two engines at once on two cores)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from service.bundled_model import HF_ID
from tests.e2e.test_adapters import BASE, upload
from tests.harness import ADMIN_TOKEN, RunningService, ServiceError, running_service
from tests.replicas import Fleet, running_fleet

pytestmark = pytest.mark.e2e

API_KEY = "e2e-client-key"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write one sentence about the sea."}]


@dataclass(frozen=True)
class Deployment:
    fleet: Fleet
    gateway: RunningService
    store: Path

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.gateway.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)

    def version_of(self, name: str) -> str:
        """The id the replicas know ``name`` by: its stored version's directory."""
        return (self.store / name).resolve().name


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    root = tmp_path_factory.mktemp("fleet")
    store, gateway_dir = root / "adapters", root / "gateway"
    gateway_dir.mkdir()
    try:
        with (
            running_fleet(store, root) as fleet,
            running_service(
                gateway_dir,
                engine_url=fleet.router_url,
                lora_resolver="true",
                adapter_dir=str(store),
                # As the deploy files set it: adapters made on the hub model are accepted.
                base_model_hf_id=HF_ID,
                admin_token=ADMIN_TOKEN,
                api_keys=API_KEY,
            ) as gateway,
        ):
            yield Deployment(fleet, gateway, store)
    except ServiceError as exc:
        pytest.fail(str(exc))


def greedy(client: openai.OpenAI, model: str) -> str:
    completion = client.chat.completions.create(model=model, messages=PROMPT, temperature=0, max_tokens=16)
    assert completion.model == model
    return completion.choices[0].message.content or ""


def test_an_adapter_registered_once_is_served_by_every_replica(
    deployment: Deployment, lora_adapter: Path
) -> None:
    client = deployment.client()
    base_answer = greedy(client, BASE)
    with deployment.gateway.admin() as admin:
        created = upload(admin, "sea-poet", lora_adapter, description="Writes about the sea")
    assert created.status_code == 201, created.text

    # Round robin: four requests reach both replicas, each loading the adapter from the store.
    answers = {greedy(client, "sea-poet") for _ in range(4)}
    version = deployment.version_of("sea-poet")
    for replica in deployment.fleet.replicas:
        assert version in replica.model_ids(), f"{replica.url} never loaded the adapter"
    # Both replicas serve the same weights: one greedy answer, not the base model's.
    assert len(answers) == 1, answers
    assert answers != {base_answer}
    models = {model.id for model in client.models.list()}
    assert {BASE, "sea-poet", "auto"} <= models
    assert version not in models, "clients see the adapter's name, not its version"


def test_stopping_a_replica_leaves_the_service_answering(
    deployment: Deployment, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    client = deployment.client()
    survivor, stopped = deployment.fleet.replicas
    stopped.stop()

    for _ in range(3):  # the router retries what it sent to the stopped replica on the other
        assert greedy(client, BASE)
        assert greedy(client, "sea-poet")
    stream = client.chat.completions.create(
        model="sea-poet", messages=PROMPT, temperature=0, max_tokens=8, stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    # Readiness asks the engine's model list, which vllm-router sends to one replica without
    # retrying: it may say 503 until the router's health checks drop the stopped replica (two
    # checks two seconds apart), well within a readiness probe's tolerance.
    assert_ready_within(deployment.gateway.url, seconds=10)

    # A registration while a replica is down reaches the one that is up.
    with deployment.gateway.admin() as admin:
        created = upload(admin, "tide-poet", other_lora_adapter)
    assert created.status_code == 201, created.text
    assert greedy(client, "tide-poet")
    assert deployment.version_of("tide-poet") in survivor.model_ids()


def test_the_gateway_needs_an_api_key(deployment: Deployment) -> None:
    response = httpx.get(f"{deployment.gateway.url}/v1/models", timeout=10)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


def assert_ready_within(url: str, *, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (ready := httpx.get(f"{url}/ready", timeout=10)).status_code != 200:
        assert time.monotonic() < deadline, ready.text
        time.sleep(0.5)

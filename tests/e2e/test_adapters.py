"""Adapters end to end: real PEFT adapters registered through the admin API, hot-loaded into the
real vLLM engine, served by name through the OpenAI SDK."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.harness import ADMIN_TOKEN, RunningService
from tests.openai_schema import assert_conforms

pytestmark = pytest.mark.e2e

BASE = "SmolLM2-135M-Instruct"
PROMPT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write one sentence about the sea."}]


def upload(
    admin: httpx.Client, name: str, adapter: Path, *, replace: bool = False, **fields: Any
) -> httpx.Response:
    data = {"name": name, "replace": str(replace).lower(), "examples": json.dumps(fields.pop("examples", []))}
    data.update({key: str(value) for key, value in fields.items()})
    files = {
        "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
    }
    return admin.post("/admin/adapters", data=data, files=files)


def answer(service: RunningService, model: str) -> str:
    completion = service.client().chat.completions.create(
        model=model, messages=PROMPT, temperature=0, max_tokens=24
    )
    return completion.choices[0].message.content or ""


def test_register_use_replace_delete(
    service: RunningService, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    base_answer = answer(service, BASE)
    with service.admin() as admin:
        created = upload(
            admin, "sea-poet", lora_adapter, description="Writes about the sea", examples=["waves"]
        )
        assert created.status_code == 201, created.text
        record = created.json()
        assert record["name"] == "sea-poet"
        assert record["rank"] == 8
        assert record["examples"] == ["waves"]

        models = service.client().models.with_raw_response.list()
        assert_conforms("ListModelsResponse", models.http_response.json())
        cards = {card["id"]: card for card in models.http_response.json()["data"]}
        assert cards["sea-poet"]["parent"] == BASE

        raw = service.client().chat.completions.with_raw_response.create(
            model="sea-poet", messages=PROMPT, temperature=0, max_tokens=24
        )
        assert_conforms("CreateChatCompletionResponse", raw.http_response.json())
        adapter_answer = raw.parse().choices[0].message.content
        assert raw.parse().model == "sea-poet"
        assert adapter_answer != base_answer, "the adapter's weights must change the output"

        # Replace through the import directory this time; the engine swaps the weights.
        shutil.copytree(other_lora_adapter, service.data_dir / "import" / "other")
        duplicate = admin.post("/admin/adapters", json={"name": "sea-poet", "path": "other"})
        assert duplicate.status_code == 409
        replaced = admin.post("/admin/adapters", json={"name": "sea-poet", "path": "other", "replace": True})
        assert replaced.status_code == 201, replaced.text
        assert replaced.json()["sha256"] != record["sha256"]
        assert answer(service, "sea-poet") not in {adapter_answer, base_answer}

        assert admin.delete("/admin/adapters/sea-poet").status_code == 204
        assert admin.get("/admin/adapters/sea-poet").status_code == 404
    with pytest.raises(openai.NotFoundError):
        answer(service, "sea-poet")
    assert "sea-poet" not in {model.id for model in service.client().models.list()}


def test_ten_concurrent_registrations(service: RunningService, lora_adapter: Path) -> None:
    names = [f"concurrent-{i}" for i in range(10)]
    with service.admin() as admin, ThreadPoolExecutor(max_workers=10) as pool:
        statuses = list(pool.map(lambda name: upload(admin, name, lora_adapter).status_code, names))
        assert statuses == [201] * 10
        served = {model.id for model in service.client().models.list()}
        assert set(names) <= served
        assert answer(service, "concurrent-7")
        for name in names:
            assert admin.delete(f"/admin/adapters/{name}").status_code == 204


def test_invalid_registrations_do_not_disturb_traffic(
    service: RunningService, lora_adapter: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(lora_adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    (broken / "adapter_config.json").write_text(json.dumps({**config, "r": 512, "use_dora": True}))
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        client = service.client(max_retries=0)
        while not stop.is_set():
            try:
                client.chat.completions.create(model="auto", messages=PROMPT, max_tokens=8)
            except openai.APIError as exc:
                failures.append(repr(exc))

    workers = [threading.Thread(target=traffic) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        with service.admin() as admin:
            refusals = [upload(admin, "broken", broken).status_code for _ in range(10)]
            refusals += [upload(admin, "Bad Name", lora_adapter).status_code for _ in range(5)]
            refusals += [upload(admin, "auto", lora_adapter).status_code for _ in range(5)]
            refusals += [
                admin.post("/admin/adapters", json={"name": "escape", "path": "../../etc"}).status_code
                for _ in range(5)
            ]
            registered = {record["name"] for record in admin.get("/admin/adapters").json()["data"]}
            assert not registered & {"broken", "Bad Name", "auto", "escape"}
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=120)
    assert refusals == [400] * 25
    assert failures == []


def test_the_cli_drives_the_admin_api(service: RunningService, lora_adapter: Path) -> None:
    env = {**os.environ, "HYBRID_GATEWAY_URL": service.url, "HYBRID_ADMIN_TOKEN": ADMIN_TOKEN}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "adapters", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    added = cli(
        "add", "from-cli", str(lora_adapter), "--description", "made by the CLI", "--example", "hello"
    )
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["examples"] == ["hello"]
    assert "from-cli" in {r["name"] for r in json.loads(cli("list").stdout)["data"]}
    assert json.loads(cli("show", "from-cli").stdout)["description"] == "made by the CLI"
    again = cli("add", "from-cli", str(lora_adapter))
    assert again.returncode == 1
    assert "exists" in again.stderr
    assert cli("rm", "from-cli").returncode == 0
    missing = cli("show", "from-cli")
    assert missing.returncode == 1
    assert "404" in missing.stderr


def test_a_stream_in_flight_survives_a_replacement(
    service: RunningService, lora_adapter: Path, other_lora_adapter: Path
) -> None:
    body = {"model": "swapped", "messages": PROMPT, "max_tokens": 200, "stream": True, "temperature": 0.8}
    with service.admin() as admin:
        assert upload(admin, "swapped", lora_adapter).status_code == 201
        payloads: list[str] = []
        with httpx.stream("POST", f"{service.url}/v1/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    payloads.append(line[6:])
                    break
            assert upload(admin, "swapped", other_lora_adapter, replace=True).status_code == 201
            payloads += [line[6:] for line in lines if line.startswith("data: ")]
        assert admin.delete("/admin/adapters/swapped").status_code == 204
    assert payloads[-1] == "[DONE]"
    assert not [p for p in payloads[:-1] if "error" in json.loads(p)], "the stream failed mid-way"
    assert len(payloads) > 3

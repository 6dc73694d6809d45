"""``hybrid-serve adapters train --register`` against the real gateway: the adapter trained here is
registered, hot-loaded into vLLM, served by name with what it learnt, and routable."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ADMIN_TOKEN, RunningService, wait_for_router
from tests.training_factory import INTENTS, banking_pairs, few_general, write_general_set, write_jsonl

pytestmark = pytest.mark.e2e

NAME = "e2e-trained-banking"


def test_a_trained_adapter_is_registered_served_and_routed(service: RunningService, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "banking.jsonl", banking_pairs("train", 12))
    env = {**os.environ, "HYBRID_GATEWAY_URL": service.url, "HYBRID_ADMIN_TOKEN": ADMIN_TOKEN}
    command = [
        sys.executable, "-m", "service", "adapters", "train",
        "--data", str(data), "--name", NAME, "--output", str(tmp_path / "out"),
        # A classifier learnt from 48 rows in 12 steps at 2e-3: it learns the intent names firmly (one
        # epoch left them half learnt, 4 of 10 served answers right in one CI run) and, at that rate,
        # damages the model far beyond the default margins (general text perplexity +42% and chat
        # perplexity +1,133% on the cut set below, in one run). The margins are opened so that what
        # this test checks is the registration path; their refusals are tested in the unit tier
        # (tests/unit/test_forgetting.py).
        "--epochs", "2", "--learning-rate", "2e-3", "--eval-steps", "2",
        "--description", "banking requests: freeze an account, change a PIN, transfer, fraud, checks",
        "--forgetting-margin", "1000", "--forgetting-chat-margin", "100000",
        "--forgetting-accuracy-margin", "100",
        # A cut of the general set (the whole one is measured in the unit tier's training fixture).
        "--general-set", str(write_general_set(tmp_path / "general", few_general())),
        "--register",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'"name": "{NAME}"' in done.stdout  # the gateway's record of the registration
    forgetting = json.loads((tmp_path / "out" / NAME / "report.json").read_text())["forgetting"]
    assert forgetting["forgets"] is False
    assert forgetting["margin"] == {
        "text_perplexity_pct": 1000.0,
        "chat_perplexity_pct": 100000.0,
        "accuracy_points": 100.0,
    }

    client = service.client()
    assert NAME in {model.id for model in client.models.list()}
    # Served by vLLM with what it learnt: the intent's name, where the base model chats.
    requests = [row["prompt"] for row in banking_pairs("val", 2)]
    answers = [
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": text}], temperature=0, max_tokens=8
        )
        .choices[0]
        .message.content
        for text in requests
    ]
    assert sum(answer in INTENTS for answer in answers) >= len(requests) // 2, answers
    base = client.chat.completions.create(
        model="SmolLM2-135M-Instruct",
        messages=[{"role": "user", "content": requests[0]}],
        temperature=0,
        max_tokens=8,
    )
    assert base.choices[0].message.content not in INTENTS

    # Routable: its examples and training prompts were taken from the training data, and the
    # router's classifier learns its class from them.
    with service.admin() as admin:
        router = wait_for_router(admin, {NAME})
        learnt = router["classifier"]["data"][NAME]
        assert learnt["example"] == 20
        assert learnt["training"] >= 20
        explained = admin.post(
            "/admin/router/explain",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "please freeze my bank account"}],
            },
        )
        assert explained.status_code == 200, explained.text
        assert explained.json()["route"]["adapter"] == NAME
        assert admin.delete(f"/admin/adapters/{NAME}").status_code == 204

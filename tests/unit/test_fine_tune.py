"""``adapters train`` on the real bundled model: a valid adapter that beats its base on held-out
rows, a report that says so, early stopping that keeps the best weights, clear refusals."""

from __future__ import annotations

import argparse
import email
import email.policy
import json
from pathlib import Path

import httpx
import pytest
from safetensors import safe_open

from adapters.fine_tune import FineTuneResult, fine_tune, routing_examples, training_prompts
from adapters.train_config import TrainConfig
from adapters.training_data import Example, Message
from adapters.validation import BaseModelInfo, validate_adapter
from service.admin_client import upload_adapter
from service.bundled_model import HF_ID, SERVED_NAME
from service.cli import main
from service.cli_train import registration_fields
from tests.training_factory import (
    TINY,
    banking_pairs,
    few_general,
    tiny_request,
    write_general_set,
    write_jsonl,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_training_publishes_a_valid_adapter_that_beats_the_base(
    trained_banking: FineTuneResult, bundled_base_dir: Path
) -> None:
    directory = trained_banking.directory
    assert directory.name == "banking-tiny"
    assert sorted(p.name for p in directory.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "loss_curve.png",
        "report.json",
    ]
    assert [p.name for p in directory.parent.iterdir()] == ["banking-tiny"]  # no scratch left behind
    # What the gateway's store will check on --register.
    base = BaseModelInfo.from_model_dir(bundled_base_dir, SERVED_NAME, HF_ID)
    config = (directory / "adapter_config.json").read_bytes()
    spec = validate_adapter(config, directory / "adapter_model.safetensors", base=base, max_rank=16)
    assert spec.rank == TINY.rank
    assert set(spec.target_modules) == set(TINY.target_modules)
    assert json.loads(config)["base_model_name_or_path"] == HF_ID

    evaluation = trained_banking.report["evaluation"]
    assert evaluation["adapter"]["loss"] < evaluation["base"]["loss"]
    assert trained_banking.beats_base
    # The base cannot know the intent names; the adapter learnt some of them in six steps.
    assert evaluation["metric"] == "label_accuracy"
    assert evaluation["base"]["metric"] == 0.0
    assert evaluation["adapter"]["metric"] > evaluation["majority_share"]


def test_the_report_records_the_run(trained_banking: FineTuneResult) -> None:
    directory = trained_banking.directory
    report = json.loads((directory / "report.json").read_text())
    assert report["data"]["train_rows"] == 48
    assert report["data"]["validation_rows"] == 12
    assert report["data"]["train_curation_counts"] == {
        "read": 60,
        "empty": 0,
        "too_long": 0,
        "duplicates": 0,
        "kept": 60,
    }
    training = report["training"]
    assert [v["step"] for v in training["validations"]] == [0, 2, 4, 6]
    # Step 0 is the base model: PEFT starts lora_B at zero.
    assert training["validations"][0]["validation_loss"] == report["evaluation"]["base"]["loss"]
    best = min(training["validations"], key=lambda v: v["validation_loss"])
    assert training["best_step"] == best["step"]
    assert report["evaluation"]["adapter"]["loss"] == best["validation_loss"]
    assert report["hyperparameters"]["rank"] == TINY.rank
    assert report["hyperparameters"]["learning_rate"] == TINY.learning_rate

    card = (directory / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert "| validation loss |" in card
    assert "| label accuracy | 0.0% |" in card
    assert "| learning_rate | 0.002 |" in card
    assert (directory / "loss_curve.png").read_bytes().startswith(PNG_MAGIC)


def test_routing_examples_are_distinct_training_prompts(trained_banking: FineTuneResult) -> None:
    examples = routing_examples(trained_banking.split.train, 20, seed=0)
    prompts = {e.prompt[-1].content for e in trained_banking.split.train}
    assert len(examples) == 20
    assert len(set(examples)) == 20
    assert set(examples) <= prompts
    assert examples == routing_examples(trained_banking.split.train, 20, seed=0)


def chat(*turns: tuple[str, str], line: int = 1) -> Example:
    return Example(tuple(Message(role, content) for role, content in turns), line)  # type: ignore[arg-type]


def asked(prompt: str, line: int = 1) -> Example:
    return chat(("user", prompt), ("assistant", "Sure."), line=line)


def test_training_prompts_are_the_distinct_last_user_messages_in_order() -> None:
    rows = [
        asked("How do I freeze my card?"),
        chat(
            ("system", "You are a bank."),
            ("user", "Hi"),
            ("assistant", "Hello."),
            ("user", "My PIN?"),
            ("assistant", "1234"),
        ),
        asked("How do I freeze my card?"),  # a duplicate
        asked("  \n"),  # blank: the admin API refuses it
        asked("x" * 2500),  # cut to the admin API's 2,000 characters...
        asked("x" * 2000 + "y"),  # ...which makes this one a duplicate
        asked("Where is my refund?"),
    ]
    assert training_prompts(rows) == [
        "How do I freeze my card?",
        "My PIN?",
        "x" * 2000,
        "Where is my refund?",
    ]
    assert training_prompts(rows, limit=2) == ["How do I freeze my card?", "My PIN?"]
    assert training_prompts([]) == []


def test_training_prompts_stop_at_5000() -> None:
    rows = [asked(f"question {i}", line=i) for i in range(6000)]
    prompts = training_prompts(rows)
    assert prompts == [f"question {i}" for i in range(5000)]


def test_register_sends_the_training_split_prompts_as_a_form_field(tmp_path: Path) -> None:
    train = [asked("How do I freeze my card?"), asked("Où est ma carte ?"), asked("How do I freeze my card?")]
    args = argparse.Namespace(name="banking", description="Cards.", examples=[], seed=0, replace=False)
    fields = registration_fields(args, train)
    assert fields["training_prompts"] == ["How do I freeze my card?", "Où est ma carte ?"]
    assert sorted(fields["examples"]) == sorted(fields["training_prompts"])  # none given: from the data

    (tmp_path / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter_model.safetensors").write_bytes(b"weights")
    sent: list[httpx.Request] = []

    def gateway(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(201, json={})

    with httpx.Client(transport=httpx.MockTransport(gateway), base_url="http://gateway") as client:
        assert upload_adapter(client, tmp_path, fields).status_code == 201
    (request,) = sent
    form = email.message_from_bytes(
        f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode() + request.content,
        policy=email.policy.HTTP,
    )
    parts = {part.get_param("name", header="content-disposition"): part for part in form.iter_parts()}
    assert json.loads(parts["training_prompts"].get_content()) == fields["training_prompts"]
    assert json.loads(parts["examples"].get_content()) == fields["examples"]


def lora_b_norm(directory: Path) -> float:
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as weights:
        return sum(float(weights.get_tensor(k).abs().sum()) for k in weights.keys() if "lora_B" in k)  # noqa: SIM118


def test_the_same_seed_gives_the_same_run(tmp_path: Path, bundled_base_dir: Path) -> None:
    config = TrainConfig(epochs=1, learning_rate=2e-3, batch_size=8, eval_steps=2, seed=7)

    def run(name: str) -> tuple[list[float], float]:
        rows = banking_pairs("train", 4)
        data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
        request = tiny_request(
            tmp_path, bundled_base_dir, train_file=data, name=name, config=config, force=True,
            general=few_general(),
        )  # fmt: skip
        result = fine_tune(request)
        return result.training.train_losses, lora_b_norm(result.directory)

    first, second = run("first"), run("second")
    assert first == second
    assert first[1] > 0


def train_cli(*args: str) -> int:
    return main(["adapters", "train", *args])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "hi", "completion": "hello"}\n{"prompt": "oops"\n', "line 2: not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', "the last message must be the assistant's"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}\n', "line 1: no user message"),
        ("", "no examples (the file is empty)"),
    ],
)
def test_bad_data_gets_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    (tmp_path / "data.jsonl").write_text(content)
    code = train_cli("--data", str(tmp_path / "data.jsonl"), "--name", "x", "--output", str(tmp_path / "out"))
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "x").exists()


def test_too_little_data_and_an_existing_output_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", banking_pairs("train", 2))
    assert train_cli("--data", str(data), "--name", "x", "--output", str(tmp_path / "out")) == 2
    assert "only 10 usable rows" in capsys.readouterr().err
    (tmp_path / "out" / "x").mkdir(parents=True)
    assert train_cli("--data", str(data), "--name", "x", "--output", str(tmp_path / "out"), "--force") == 2
    assert "already exists (--overwrite replaces it)" in capsys.readouterr().err


def test_early_stopping_keeps_the_best_weights_and_a_useless_adapter_is_not_registered(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A learning rate of 1 wrecks the adapter in its first steps: no validation beats step 0, so
    # training stops at the first one and keeps step 0, the base model itself, which --register
    # then refuses before any request (nothing listens here).
    monkeypatch.setenv("HYBRID_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HYBRID_ADMIN_TOKEN", "unused")
    data = write_jsonl(tmp_path / "data.jsonl", banking_pairs("train", 12))
    code = train_cli(
        "--data", str(data), "--name", "x", "--output", str(tmp_path / "out"), "--learning-rate", "1",
        "--epochs", "1", "--eval-steps", "2", "--patience", "1", "--register",
        "--general-set", str(write_general_set(tmp_path / "general", few_general())),
    )  # fmt: skip
    assert code == 1
    assert "not registered: the adapter does not beat the base model" in capsys.readouterr().err
    report = json.loads((tmp_path / "out" / "x" / "report.json").read_text())
    assert report["training"]["stopped_early"] is True
    assert [v["step"] for v in report["training"]["validations"]] == [0, 2]
    assert report["training"]["best_step"] == 0
    assert lora_b_norm(tmp_path / "out" / "x") == 0.0
    assert "does not lower the base model's validation loss" in report["verdict"]

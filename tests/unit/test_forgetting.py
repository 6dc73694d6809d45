"""Forgetting on the real bundled model: an untouched adapter changes nothing on the general set, a
damaged one is caught; the report, the model card and both registration paths act on it."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from adapters.fine_tune import FineTuneResult
from adapters.forgetting import (
    WINDOW,
    Forgetting,
    ForgettingMargin,
    GeneralScores,
    contains,
    forgetting_verdict,
    general_set,
    measure_forgetting,
    text_windows,
)
from adapters.training_data import normalise
from service.cli import main
from service.cli_adapters import forgetting_refusal
from service.cli_train import refusals
from tests.training_factory import FEW_ROWS, TINY, banking_pairs, few_general, write_general_set, write_jsonl


def test_the_shipped_general_set_is_whole_and_consistent() -> None:
    general = general_set()
    assert len(general.chat) == len(general.expected) == 60
    assert len({e.prompt for e in general.chat}) == 60
    # Every reference answer contains what the accuracy looks for: the check can be met.
    assert all(contains(e.answer, x) for e, x in zip(general.chat, general.expected, strict=True))
    assert all(x == normalise(x) and x for x in general.expected)
    assert len(general.text.split("\n\n")) == 30


def test_containment_is_by_whole_words() -> None:
    assert contains("The capital of France is Paris.", "paris")
    assert contains("2 + 2 = 4", "4")
    assert not contains("100 - 1 = 9.", "99")
    assert not contains("There are 14 days in a fortnight.", "4")
    assert contains("Apple, mango and pear.", "apple mango")


def test_the_text_is_cut_into_fixed_windows_every_token_scored(bundled_base_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(bundled_base_dir)
    text = general_set().text
    windows = text_windows(tokenizer, text)
    assert [len(w.input_ids) for w in windows[:-1]] == [WINDOW] * (len(windows) - 1)
    assert [t for w in windows for t in w.input_ids] == tokenizer(text)["input_ids"]
    assert all(w.labels == w.input_ids for w in windows)
    assert 10 <= len(windows) <= 14


def lora_model(base_dir: Path, *, noise: float) -> Any:
    """The bundled model under a fresh LoRA, ``lora_B`` filled with seeded noise (0: untouched)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=list(TINY.target_modules)))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, noise)
    return model


def measure(base_dir: Path, noise: float) -> Forgetting:
    from transformers import AutoTokenizer

    from adapters.chat_tokens import ChatEncoder
    from adapters.device import place

    encoder = ChatEncoder(AutoTokenizer.from_pretrained(base_dir))
    return measure_forgetting(
        lora_model(base_dir, noise=noise),
        encoder,
        placement=place("cpu", "auto"),
        margin=ForgettingMargin(),
        general=few_general(),
    )


def test_an_untouched_adapter_changes_nothing(bundled_base_dir: Path) -> None:
    forgetting = measure(bundled_base_dir, noise=0.0)
    assert forgetting.adapter == forgetting.base  # lora_B at zero: the very same outputs
    assert forgetting.text_perplexity_change_pct == 0.0
    assert forgetting.chat_accuracy_change_points == 0.0
    assert not forgetting.forgets
    assert forgetting.text_tokens > 256  # more than one window
    assert forgetting.base.chat_rows == FEW_ROWS
    # The bundled model does know some of it: the accuracy can fall.
    assert forgetting.base.chat_correct >= FEW_ROWS // 3


def test_a_damaged_adapter_is_caught(bundled_base_dir: Path) -> None:
    forgetting = measure(bundled_base_dir, noise=0.3)
    assert forgetting.text_perplexity_change_pct > 100
    assert forgetting.chat_perplexity_change_pct > 100
    assert forgetting.adapter.chat_correct < forgetting.base.chat_correct
    assert forgetting.forgets
    assert any(r.startswith("general text perplexity +") for r in forgetting.reasons)
    assert "Registration refuses it (--force overrides)" in forgetting_verdict(forgetting)


def scores(text_loss: float, chat_loss: float, correct: int) -> GeneralScores:
    return GeneralScores(text_loss, chat_loss, correct, 60)


def test_the_margin_is_a_percentage_of_perplexity_and_points_of_accuracy() -> None:
    base = scores(3.0, 1.0, 30)
    margin = ForgettingMargin(text_perplexity_pct=10, chat_perplexity_pct=20, accuracy_points=10)

    def judged(adapter: GeneralScores) -> Forgetting:
        return Forgetting(base, adapter, margin, text_tokens=3000, seconds=1.0)

    # exp(0.09) - 1 = 9.4%: within; exp(0.1) - 1 = 10.5%: beyond.
    assert not judged(scores(3.09, 1.0, 30)).forgets
    assert judged(scores(3.1, 1.0, 30)).reasons == ["general text perplexity +10.5% (margin 10%)"]
    assert not judged(scores(3.0, 1.1, 30)).forgets
    assert judged(scores(3.0, 1.2, 30)).reasons == ["general chat perplexity +22.1% (margin 20%)"]
    # 6 rows of 60 is 10 points: within; 7 is beyond. Better is never a fault.
    assert not judged(scores(3.0, 1.0, 24)).forgets
    assert judged(scores(3.0, 1.0, 23)).reasons == ["general chat accuracy -11.7 points (margin 10)"]
    assert not judged(scores(1.0, 0.5, 60)).forgets
    report = judged(scores(3.1, 1.0, 23)).to_json()
    assert report["forgets"] is True
    assert report["change"] == {
        "text_perplexity_pct": 10.52,
        "chat_perplexity_pct": 0.0,
        "chat_accuracy_points": -11.67,
    }
    assert report["margin"] == {"text_perplexity_pct": 10, "chat_perplexity_pct": 20, "accuracy_points": 10}
    with pytest.raises(ValueError, match="cannot be negative"):
        ForgettingMargin(chat_perplexity_pct=-1)


def test_the_report_and_the_card_give_the_general_quality(trained_banking: FineTuneResult) -> None:
    report = json.loads((trained_banking.directory / "report.json").read_text())
    forgetting = report["forgetting"]
    assert forgetting == trained_banking.forgetting.to_json()
    assert forgetting["chat_rows"] == 60
    assert forgetting["text_tokens"] > 2900
    assert forgetting["base"]["chat_correct"] > 20
    assert forgetting["margin"] == ForgettingMargin().to_json()
    assert forgetting_verdict(trained_banking.forgetting) in report["verdict"]
    card = (trained_banking.directory / "README.md").read_text()
    assert "## General quality (forgetting)" in card
    assert "| general text perplexity | " in card
    assert "| general chat accuracy | " in card
    change = forgetting["change"]["text_perplexity_pct"]
    assert f"| {change:+.1f}% |" in card


def test_an_adapter_that_answers_everything_with_its_labels_forgets(trained_banking: FineTuneResult) -> None:
    # Trained on bare requests answered with an intent's name, it answers general questions with
    # intent names too: it beats the base on its task and has forgotten how to chat.
    forgetting = trained_banking.forgetting
    assert trained_banking.beats_base
    assert trained_banking.forgets
    assert forgetting.chat_accuracy_change_points < -20
    assert forgetting.chat_perplexity_change_pct > 50
    (refusal,) = refusals(trained_banking)
    assert refusal.startswith("the adapter forgets what the base model could do: general chat perplexity +")
    assert "general chat accuracy -" in refusal
    # Chat margins that allow it (what the e2e test registers with) register it, the general text
    # still guarding the language model itself.
    allowed = dataclasses.replace(forgetting, margin=ForgettingMargin(10, 1000, 100))
    assert refusals(dataclasses.replace(trained_banking, forgetting=allowed)) == []
    forgetful_text = dataclasses.replace(allowed, base=scores(3.0, 1.0, 30), adapter=scores(3.5, 1.0, 30))
    assert refusals(dataclasses.replace(trained_banking, forgetting=forgetful_text)) == [
        "the adapter forgets what the base model could do: general text perplexity +64.9% (margin 10%)"
    ]


def test_adapters_add_refuses_a_directory_whose_report_says_it_forgets(
    tmp_path: Path,
    trained_banking: FineTuneResult,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Refused before any request: nothing listens at the gateway's address.
    monkeypatch.setenv("HYBRID_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HYBRID_ADMIN_TOKEN", "unused")
    directory = shutil.copytree(trained_banking.directory, tmp_path / "adapter")
    report = json.loads((directory / "report.json").read_text())
    report["forgetting"].update(forgets=False, reasons=[])
    (directory / "report.json").write_text(json.dumps(report))
    assert forgetting_refusal(directory) is None
    report["forgetting"].update(forgets=True, reasons=["general text perplexity +64.9% (margin 10%)"])
    (directory / "report.json").write_text(json.dumps(report))
    assert main(["adapters", "add", "banking", str(directory)]) == 1
    assert capsys.readouterr().err == (
        "not registered: its report says it forgets what the base model could do: general text "
        "perplexity +64.9% (margin 10%) (--force registers it)\n"
    )
    (directory / "report.json").unlink()
    assert forgetting_refusal(directory) is None  # an adapter made elsewhere: nothing to go on


def test_train_register_refuses_an_adapter_trained_to_forget(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every answer is the same nonsense: the adapter learns it at once (so it beats the base on
    # its own held-out rows) and then answers everything with it.
    monkeypatch.setenv("HYBRID_GATEWAY_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("HYBRID_ADMIN_TOKEN", "unused")
    rows = [{**row, "completion": "zq zq zq zq zq zq zq zq"} for row in banking_pairs("train", 12)]
    data = write_jsonl(tmp_path / "nonsense.jsonl", rows)
    general = write_general_set(tmp_path / "general", few_general())  # one's own set: here a cut
    code = main(
        [
            "adapters", "train", "--data", str(data), "--name", "nonsense", "--output", str(tmp_path / "out"),
            "--learning-rate", "2e-3", "--epochs", "1", "--eval-steps", "6", "--register",
            "--general-set", str(general),
        ]
    )  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "not registered: the adapter does not beat the base model" not in err
    assert "not registered: the adapter forgets what the base model could do: general chat" in err
    report = json.loads((tmp_path / "out" / "nonsense" / "report.json").read_text())
    assert report["forgetting"]["forgets"] is True
    assert report["forgetting"]["general_set"] == str(general)
    assert report["forgetting"]["chat_rows"] == FEW_ROWS
    assert report["forgetting"]["adapter"]["chat_correct"] < report["forgetting"]["base"]["chat_correct"]
    card = (tmp_path / "out" / "nonsense" / "README.md").read_text()
    assert "**Beyond the margin:** general" in card
    assert f"the general set in `{general}`" in card


@pytest.mark.parametrize(
    ("chat", "text", "message"),
    [
        (None, "Prose.", "no general_chat.jsonl (a general set holds general_chat.jsonl and general_text"),
        ('{"messages": [{"role": "user", "content": "Hi"}], "expect": "hi"}\n', "Prose.", "line 1: the last"),
        ('{"messages": [{"role": "user", "content": "Hi"}]}\n', "Prose.", "line 1: expected {\"messages\""),
        ("not json\n", "Prose.", "general_chat.jsonl line 1: expected"),
        ('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], '
         '"expect": "hello"}\n', "", "must not be empty"),
    ],
)  # fmt: skip
def test_a_general_set_of_ones_own_is_checked_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], chat: str | None, text: str, message: str
) -> None:
    general = tmp_path / "general"
    general.mkdir()
    if chat is not None:
        (general / "general_chat.jsonl").write_text(chat)
    (general / "general_text.txt").write_text(text)
    data = write_jsonl(tmp_path / "data.jsonl", banking_pairs("train", 12))
    out = tmp_path / "out"
    code = main(
        [
            "adapters", "train", "--data", str(data), "--name", "x", "--output", str(out),
            "--general-set", str(general),
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: general set {general}")
    assert message in err
    assert not out.exists()  # refused before the model is loaded

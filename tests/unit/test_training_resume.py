"""``adapters train --resume``: a run interrupted after a checkpoint goes on from it and ends
where the uninterrupted run ends; checkpoints of another run are refused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.fine_tune import FineTuneResult, checkpoint_dir, fine_tune
from adapters.hf_trainer import EvaluateAtTheEnd
from adapters.trainer import latest_checkpoint
from tests.training_factory import banking_pairs, few_general, tiny_request, write_jsonl


class SimulatedKillError(Exception):
    """Stands in for a killed process: raised from inside the training loop."""


def interrupt_at(step: int, monkeypatch: pytest.MonkeyPatch) -> None:
    original = EvaluateAtTheEnd.on_step_end

    def on_step_end(self: Any, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step == step:
            raise SimulatedKillError
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(EvaluateAtTheEnd, "on_step_end", on_step_end)


def test_an_interrupted_run_resumes_from_its_checkpoint_and_ends_like_an_uninterrupted_one(
    tmp_path: Path,
    bundled_base_dir: Path,
    trained_banking: FineTuneResult,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same run as trained_banking; forgetting, measured after training, on a cut of the set.
    request = tiny_request(tmp_path, bundled_base_dir, general=few_general())
    with monkeypatch.context() as patch:
        interrupt_at(3, patch)
        with pytest.raises(SimulatedKillError):
            fine_tune(request)
    checkpoints = checkpoint_dir(request)
    assert latest_checkpoint(checkpoints) == checkpoints / "checkpoint-2"
    assert not (request.output / request.name).exists()

    resumed = fine_tune(replace_resume(request))
    assert resumed.training.resumed_from == 2
    assert resumed.report["training"]["resumed_from_step"] == 2
    expected = trained_banking.training
    assert [v.step for v in resumed.training.validations] == [v.step for v in expected.validations]
    assert resumed.training.best_step == expected.best_step
    assert resumed.training.train_losses == pytest.approx(expected.train_losses, rel=1e-4)
    assert [v.loss for v in resumed.training.validations] == pytest.approx(
        [v.loss for v in expected.validations], rel=1e-4
    )
    assert not checkpoints.exists()  # published: nothing left to resume
    assert [p.name for p in request.output.iterdir()] == [request.name]


def replace_resume(request: Any, **changes: Any) -> Any:
    from dataclasses import replace

    return replace(request, resume=True, **changes)


def test_resume_refuses_another_runs_checkpoints_and_a_run_that_never_started(
    tmp_path: Path, bundled_base_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    request = tiny_request(tmp_path, bundled_base_dir, name="other")
    with pytest.raises(ValueError, match="--resume: no interrupted run under"):
        fine_tune(replace_resume(request))

    with monkeypatch.context() as patch:
        interrupt_at(3, patch)
        with pytest.raises(SimulatedKillError):
            fine_tune(request)
    recorded = json.loads((checkpoint_dir(request) / "run.json").read_text())
    assert set(recorded) == {"base_model", "settings", "rows_sha256"}

    fewer = write_jsonl(tmp_path / "fewer.jsonl", banking_pairs("train", 11))
    with pytest.raises(ValueError, match="of a run with other rows_sha256"):
        fine_tune(replace_resume(request, train_file=fewer))
    # A fresh run (no --resume) starts again and clears the stale checkpoints.
    assert latest_checkpoint(checkpoint_dir(request)) is not None

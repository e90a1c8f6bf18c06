"""StepProgress: a line every N steps with the run's step count and the time to go."""

from __future__ import annotations

import lightning as L
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

import callbacks.progress as progress
from callbacks.progress import StepProgress, seconds_to_go


def test_time_to_go_is_the_steps_left_at_the_rate_so_far_or_the_time_limit_if_sooner():
    assert seconds_to_go(100, 300, elapsed=20.0, time_left=None) == pytest.approx(60.0)
    assert seconds_to_go(100, 300, elapsed=20.0, time_left=45.0) == 45.0
    assert seconds_to_go(100, None, elapsed=20.0, time_left=45.0) == 45.0
    assert seconds_to_go(100, None, elapsed=20.0, time_left=None) is None


@pytest.mark.parametrize("accumulate", [1, 2])
def test_one_line_every_n_steps_counts_the_runs_steps_not_an_epochs_batches(tmp_path, monkeypatch, accumulate):
    """BoringModel's epoch is 64 batches; the lines count optimizer steps of max_steps across epochs."""
    lines = []
    monkeypatch.setattr(progress, "rank_zero_info", lines.append)
    trainer = L.Trainer(
        max_steps=40, accumulate_grad_batches=accumulate, callbacks=[StepProgress(every_n_steps=20)], accelerator="cpu",
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_train_batches=16, limit_val_batches=0, default_root_dir=tmp_path,
    )
    trainer.fit(BoringModel())
    assert [line.split(" in ")[0] for line in lines] == ["step 20/40 (50%)", "step 40/40 (100%)"]
    assert lines[0].split(", ")[-1].endswith(" to go") and lines[1].split(", ")[-1] == "0:00:00 to go"

"""What a training run prints: a model summary without Lightning's FLOPs column and a progress
bar that counts steps.

Lightning 2.6's summary adds a FLOPs column measured on `example_input_array`, which none of
Tessera's modules define (their inputs are batches of a datamodule), so it reads 0 everywhere; the
MFU logged during training is the FLOPs figure that means something. Its Rich progress bar writes
"Epoch 3/-2" when training is bounded by `max_steps` (max_epochs -1), which every config does.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelSummary, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_summary import get_human_readable_count


class ParameterSummary(ModelSummary):
    """One line per top-level module (name, type, parameters, trainable or frozen), then the totals."""

    @staticmethod
    def summarize(summary_data, total_parameters, trainable_parameters, model_size, total_training_modes,
                  total_flops, **summarize_kwargs) -> None:
        rank_zero_info(parameter_table(dict(summary_data), total_parameters, trainable_parameters, model_size))


def parameter_table(columns: dict[str, list[str]], total: int, trainable: int, size_mb: float) -> str:
    """The summary's text from Lightning's columns (Name, Type, Params, ...), FLOPs left out."""
    names, types, params = columns["Name"], columns["Type"], columns["Params"]
    name_width, type_width = max(map(len, names), default=4), max(map(len, types), default=4)
    rows = [f"  {name:<{name_width}}  {kind:<{type_width}}  {count:>7}" for name, kind, count in zip(names, types, params)]
    totals = (
        f"  parameters: {get_human_readable_count(trainable)} trainable, "
        f"{get_human_readable_count(total - trainable)} frozen, {get_human_readable_count(total)} total "
        f"({size_mb:.1f} MB in fp32)"
    )
    return "\n".join(rows + [totals])


class StepProgressBar(RichProgressBar):
    """Lightning's Rich progress bar, described as "Epoch E, step S/M" when `max_steps` bounds the run."""

    def _get_train_description(self, current_epoch: int) -> str:
        trainer = self.trainer
        description = f"Epoch {current_epoch}"
        if trainer.max_epochs is not None and trainer.max_epochs > 0:
            description += f"/{trainer.max_epochs - 1}"
        if trainer.max_steps > 0:
            description += f", step {trainer.global_step}/{trainer.max_steps}"
        return description

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.progress is not None and self.train_progress_bar_id is not None and trainer.max_steps > 0:
            self.progress.update(self.train_progress_bar_id, description=self._get_train_description(trainer.current_epoch))
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def replace_default_console_callbacks(trainer: L.Trainer) -> None:
    """Swap Lightning's own summary and Rich progress bar (not a user's subclass of them) for ours."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (ModelSummary, RichModelSummary):
            trainer.callbacks[index] = ParameterSummary(max_depth=callback._max_depth)
        elif type(callback) is RichProgressBar:  # TQDM's bar shows no epoch total: nothing to mend
            trainer.callbacks[index] = StepProgressBar()

"""Weights & Biases for cluster runs: one W&B run per run directory, whatever the requeues.

A requeued SLURM job runs the same command again in the same run directory. `RunDirWandbLogger`
keeps the W&B run id in a file there (`wandb_run_id.txt`), written once by global rank 0, and
resumes that run on every later launch (`resume="allow"`), online or offline. Offline runs of
one id sync into one W&B run: `wandb sync RUN_DIR/wandb/offline-run-*`.

`SaveAndLogConfig` is LightningCLI's config callback that also logs the resolved config to the
loggers (from rank 0 only). API keys come only from WANDB_API_KEY or `wandb login`'s netrc:
anything that looks like one in a config or in the logger's arguments is refused, so it is never
written to config.yaml, the W&B run or a log.
"""

from __future__ import annotations

import os
import re
import secrets
import string
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

RUN_ID_FILE = "wandb_run_id.txt"

# names under which a secret would be passed (wandb.Settings(api_key=...)), by their ending; not
# "token", which in this codebase names text and image tokens
_SECRET_NAMES = ("api_key", "apikey", "access_key", "secret", "password")
# W&B API keys: 40 hex characters, after a prefix such as "local-" on W&B Server; keys issued
# since late 2025 are 86 characters long. Run names, tags and paths are shorter or hold spaces,
# dots or slashes.
_KEY_SHAPED = re.compile(r"(?:\w+-)?[0-9a-f]{40}|[\w-]{80,}")


def find_api_key(value: Any, path: str = "") -> str | None:
    """The path (`settings.api_key`, `tags[2]`, ...) of the first thing in `value` that is or looks
    like a W&B API key: a field named like a secret, the key in WANDB_API_KEY, or a key-shaped string.
    Walks mappings, lists, tuples and pydantic models (wandb.Settings); None when there is none."""
    if hasattr(value, "model_dump"):
        value = value.model_dump()
    if isinstance(value, Mapping):
        for name, item in value.items():
            item_path = f"{path}.{name}" if path else str(name)
            if item is not None and str(name).lower().endswith(_SECRET_NAMES):
                return item_path
            if (found := find_api_key(item, item_path)) is not None:
                return found
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if (found := find_api_key(item, f"{path}[{index}]")) is not None:
                return found
    elif isinstance(value, str):
        env_key = os.environ.get("WANDB_API_KEY")
        if (env_key and env_key in value) or _KEY_SHAPED.fullmatch(value):
            return path or "the value"
    return None


def refuse_api_keys(value: Any, where: str) -> None:
    """Raise if `value` holds something that looks like an API key; the message never repeats it."""
    found = find_api_key(value)
    if found is not None:
        raise ValueError(
            f"{where}: `{found}` is or looks like a W&B API key. Keys never go into configs or logger "
            "arguments (they would be written to config.yaml, the W&B run and the logs): set "
            "WANDB_API_KEY in the job's environment or run `wandb login` once instead."
        )


class RunDirWandbLogger(WandbLogger):
    """A WandbLogger whose run belongs to its run directory, so every relaunch continues it.

    Without an explicit `id`, global rank 0 reads the run id from `save_dir/wandb_run_id.txt`, or
    draws one and writes it there on the first launch, when the run starts. Other ranks never
    start a W&B run (Lightning's `rank_zero_experiment`) and never touch the file. W&B's files go
    to `save_dir/wandb/`. `resume="allow"` (WandbLogger's default): W&B continues the run when it
    exists and creates it when not. Offline (`offline=True` or WANDB_MODE=offline), each launch
    writes `save_dir/wandb/offline-run-*-<id>/`, and `wandb sync` uploads them into the one run.

    Args:
        save_dir: the run directory, so that one run directory is one W&B run (and a new
            directory a new run); `tessera fit` gives it the trainer's `default_root_dir`.
        project: the W&B project (default: WANDB_PROJECT, else "lightning_logs").
        entity: the W&B user or team (default: your default entity).
        name: the run's display name (W&B makes one up otherwise).
        group: groups runs in the UI, e.g. the stage-1 and stage-2 runs of one model.
        tags: tags shown in the UI.
        notes: a longer description of the run.
        id: the W&B run id, only to attach to a run made elsewhere; by default it comes from the run directory.
        offline: write W&B's files only, for `wandb sync` later (WANDB_MODE=offline does the same).
        **kwargs: the rest of WandbLogger's arguments and of `wandb.init`'s (`job_type`, `settings`, ...).
    """

    def __init__(
        self,
        save_dir: str | None = None,
        project: str | None = None,
        entity: str | None = None,
        name: str | None = None,
        group: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        id: str | None = None,
        offline: bool = False,
        **kwargs: Any,
    ):
        # LightningCLI type-checks a config without building it, so a missing run directory is
        # only caught here, on every rank, before anything starts
        if save_dir is None:
            raise ValueError(
                "RunDirWandbLogger needs save_dir, the run directory (the trainer's default_root_dir): "
                "e.g. --trainer.logger.init_args.save_dir=RUN_DIR"
            )
        refuse_api_keys(
            dict(project=project, entity=entity, name=name, group=group, tags=tags, notes=notes, id=id, **kwargs),
            "RunDirWandbLogger",
        )
        super().__init__(
            save_dir=save_dir, project=project, entity=entity, name=name, group=group, tags=tags, notes=notes,
            id=id, offline=offline, **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # WandbLogger always passes it, and W&B warns that the setting is gone whatever its value
            del self._wandb_init["anonymous"]

    @property
    def run_id_file(self) -> Path:
        return Path(self.save_dir) / RUN_ID_FILE

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and self._wandb_init["id"] is None:
            self._id = self._wandb_init["id"] = self._run_id()
        return super().experiment

    def _run_id(self) -> str:
        """The run directory's W&B run id, drawn and written on the first launch; rank 0 only."""
        assert rank_zero_only.rank == 0, "only global rank 0 reads or writes the W&B run id file"
        path = self.run_id_file
        if path.exists():
            return path.read_text().strip()
        # W&B's own alphabet and length; `secrets`, so that seed_everything cannot repeat an id
        run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        path.parent.mkdir(parents=True, exist_ok=True)
        # written whole or not at all: a job killed here must not leave a truncated id behind
        partial = path.with_name(path.name + ".partial")
        partial.write_text(run_id + "\n")
        os.replace(partial, path)
        return run_id


class SaveAndLogConfig(SaveConfigCallback):
    """LightningCLI's SaveConfigCallback (config.yaml in the log directory) that also logs the
    resolved config, every section, to the trainer's loggers from global rank 0: W&B shows it as
    the run's config. A config holding something that looks like an API key is refused when the
    callback is made, on every rank, before the trainer exists and before any file is written."""

    def __init__(self, parser, config, *args, **kwargs):
        super().__init__(parser, config, *args, **kwargs)
        refuse_api_keys(self._resolved_config(), "the config")

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        config = self._resolved_config()
        for logger in trainer.loggers:
            logger.log_hyperparams(config)

    def _resolved_config(self) -> dict:
        # the same text config.yaml gets, as plain data
        return yaml.safe_load(self.parser.dump(self.config, skip_none=False))

"""The ops after which a CUDA host waits for the GPU: a value read back (`.item()`, `int(t)`, `bool(t)`)
or an output sized by the data (`nonzero`, boolean-mask indexing, `bincount`, `unique`). Recorded
on any device, so a CPU test can pin that a training step has none but the ones it is designed
with. Blocking host-to-GPU copies (a Python number made a CUDA tensor) are the other kind of sync:
only a GPU sees those (`torch.cuda.set_sync_debug_mode`, bench/host_syncs.py)."""

from __future__ import annotations

import traceback
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
REPO = Path(__file__).resolve().parents[1]

READ_BACK = {
    aten._local_scalar_dense, aten.nonzero, aten.bincount, aten.masked_select, aten._unique2, aten.unique_dim,
    aten.unique_consecutive, aten.is_nonzero, aten.equal, aten.repeat_interleave,
}
MASK_INDEXED = {aten.index, aten.index_put, aten.index_put_}


def _masked(args: tuple) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])


def _caller() -> str:
    """The innermost frame of this repository's code outside tests/, as file:line."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if path.is_file() and path.is_relative_to(REPO) and not path.is_relative_to(REPO / "tests"):
            return f"{path.relative_to(REPO)}:{frame.lineno}"
    return "elsewhere"


class RecordReadbacks(TorchDispatchMode):
    """`ops`: every read-back op run inside, as "op at file:line" of the repository code that ran it."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        packet = func._overloadpacket
        if packet in READ_BACK or (packet in MASK_INDEXED and _masked(args)):
            self.ops.append(f"{packet.__name__} at {_caller()}")
        return func(*args, **(kwargs or {}))


class ReadbacksPerStep(L.Callback):
    """The read-back ops of each training batch but the last, from its start to the next one's: the
    step, the optimizer's and Lightning's work between batches (the last one's window would take in
    the end of training)."""

    def __init__(self):
        self.steps: list[list[str]] = []
        self._mode: RecordReadbacks | None = None

    def _close(self, keep: bool) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            if keep:
                self.steps.append(self._mode.ops)
            self._mode = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._close(keep=True)
        self._mode = RecordReadbacks()
        self._mode.__enter__()

    def on_train_end(self, trainer, pl_module):
        self._close(keep=False)

    def on_exception(self, trainer, pl_module, exception):
        self._close(keep=False)

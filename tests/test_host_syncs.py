"""Training steps make the host wait for the GPU only where they are designed to: the non-finite
guard's one decision per step (lightning_modules/nonfinite.py) and Lightning's read-back of the
loss it shows on the progress bar at each batch's end. On the CPU the read-backs are recorded by
op (tests/readbacks.py); the blocking host-to-GPU copies only a GPU sees are counted in
tests/test_gpu.py and bench/host_syncs.py."""

from __future__ import annotations

from collections import deque

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.prior import TextImagePrior
from tessera.nn.lookup_free_quantizer import LookupFreeQuantizer
from tessera.nn.residual_quantizer import ResidualQuantizer
from tessera.nn.vector_quantizer import VectorQuantizer
from tests.devices import DEVICES
from tests.distributed import run_distributed
from tests.readbacks import ReadbacksPerStep, RecordReadbacks
from tests.test_prior import tiny_prior, tokenizer_dir  # noqa: F401 (tokenizer_dir: a fixture)
from tests.test_vqgan import loader, tiny_vqgan, trainer

DESIGNED = ["_local_scalar_dense at lightning_modules/nonfinite.py:55", "_local_scalar_dense at elsewhere"]


def restarting_quantizers() -> dict:
    return {
        "vq_ema_restarts": VectorQuantizer(dim=4, codebook_size=32, ema_decay=0.9, dead_code_threshold=1.0, usage_window=24),
        "vq_restarts": VectorQuantizer(dim=4, codebook_size=32, dead_code_threshold=1.0, usage_window=24),
        "rq": ResidualQuantizer(dim=4, codebook_size=32, depth=2, dead_code_threshold=1.0, usage_window=24),
        "lfq": LookupFreeQuantizer(dim=4, usage_window=24),
    }


def _quantizers_on_uneven_ranks(rank: int, world_size: int) -> dict:
    """Each quantizer's training forwards on rank 0's 2x2 and rank 1's 3x3 grids (more than the
    window on rank 1 in the last step), with the read-backs they made."""
    torch.manual_seed(0)
    quantizers = restarting_quantizers()
    outputs = {name: [] for name in quantizers}
    with RecordReadbacks() as recorded:
        for step in range(3):
            side = 2 + rank + (step == 2) * 2 * rank  # rank 1: 3x3, then 5x5 (25 ids > the window of 24)
            z = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(10 * step + rank))
            for name, quantizer in quantizers.items():
                out = quantizer(z)
                outputs[name].append({"ids": out.ids, "stats": out.stats})
    usage = {name: q.vq.codebook_usage if name == "rq" else q.codebook_usage for name, q in quantizers.items()}
    return {"readbacks": recorded.ops, "outputs": outputs, "counts": {name: u.counts for name, u in usage.items()}}


def test_quantizers_train_without_read_backs_and_count_the_newest_ids_of_uneven_ranks_in_rank_order():
    ranks = run_distributed(_quantizers_on_uneven_ranks)
    for rank in ranks:
        assert rank["readbacks"] == []
    for name, quantizer in restarting_quantizers().items():
        stream = deque(maxlen=24)  # the window's reference: the newest 24 ids, rank 0's then rank 1's each step
        for step in range(3):
            for rank in ranks:
                stream.extend(rank["outputs"][name][step]["ids"].flatten().tolist())
            counts = torch.bincount(torch.tensor(list(stream)), minlength=quantizer.codebook_size)
            for rank in ranks:
                usage = rank["outputs"][name][step]["stats"]["usage"]
                assert usage == (counts > 0).float().mean(), (name, step)
        for rank in ranks:
            assert torch.equal(rank["counts"][name], counts), name
    dead = [rank["outputs"]["vq_ema_restarts"][0]["stats"]["dead_codes"] for rank in ranks]
    assert dead[0] == dead[1] > 0  # restarts happened, decided alike on both ranks


class CaptionedImages(Dataset):
    """Eight captions with 32 px images, which the prior's frozen tokenizer encodes in its step."""

    def __init__(self, prior: TextImagePrior):
        captions = prior.captions([f"{n} red circles" for n in range(8)])
        images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
        self.samples = [{"text_ids": captions.ids[i], "text_mask": captions.mask[i], "images": images[i]} for i in range(8)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def test_a_prior_step_on_images_reads_back_only_the_nonfinite_decision_and_the_progress_bar_loss(tmp_path, tokenizer_dir):
    prior, readbacks = tiny_prior(tokenizer_dir, caption_dropout=0.5), ReadbacksPerStep()
    trainer(tmp_path, max_steps=4, callbacks=[readbacks]).fit(prior, DataLoader(CaptionedImages(prior), batch_size=2))
    assert readbacks.steps == [DESIGNED] * 3


@pytest.mark.parametrize("quantizer", ["vq_ema_restarts", "lfq"])
def test_a_tokenizer_step_reads_back_only_the_nonfinite_decision_and_the_progress_bar_loss(tmp_path, quantizer):
    torch.manual_seed(0)
    model, readbacks = tiny_vqgan(quantizer=restarting_quantizers()[quantizer]), ReadbacksPerStep()
    trainer(tmp_path, max_steps=3, callbacks=[readbacks]).fit(model, loader(num_samples=24))
    assert readbacks.steps == [DESIGNED] * 2


def test_the_prior_logs_tensors_never_python_numbers(tokenizer_dir):
    """Lightning turns a logged Python number into a tensor on the module's device: a blocking copy to the GPU."""
    prior = tiny_prior(tokenizer_dir, peak_flops=1e12)
    logged = {}
    prior.log = lambda name, value, **kwargs: logged.update({name: value})
    prior.log_dict = lambda values, **kwargs: logged.update(values)
    prior._device_peak_flops = 1e12
    prior.log_throughput(batch_size=4)  # the first step only starts the clock
    prior._trainer = type("FitTrainer", (), {"world_size": 1})()
    prior.log_throughput(batch_size=4)
    assert {"throughput/samples_per_s", "throughput/tokens_per_s", "throughput/mfu"} <= logged.keys()
    assert all(isinstance(value, torch.Tensor) for value in logged.values()), logged


@pytest.mark.parametrize("device", DEVICES)
def test_dropped_captions_are_drawn_on_the_modules_device_and_repeat_for_a_step(device, tokenizer_dir):
    prior = tiny_prior(tokenizer_dir, caption_dropout=0.5).to(device)
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # a mask drawn on the CPU would be copied over, a sync
    try:
        dropped = prior.dropped_captions(64)
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    assert dropped.device.type == device and dropped.dtype == torch.bool
    assert torch.equal(dropped, prior.dropped_captions(64)) and 16 < int(dropped.sum()) < 48

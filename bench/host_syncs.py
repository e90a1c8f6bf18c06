"""Host syncs per training step of both stages: how often the CPU waits for the GPU in a step.

A sync (a value read back, an output sized by data, a blocking copy of a CPU tensor to the GPU)
stops the host from queueing the next kernels while the GPU drains its queue. The steps are
designed with two per step, whatever the model's size:
  - the non-finite guard's decision whether to apply the step (lightning_modules/nonfinite.py),
    the same on every rank, before the optimizer step;
  - Lightning's read-back, at each batch's end, of the loss it shows on the progress bar.
Each setting trains a small model for a few steps through Lightning's Trainer (bf16-mixed on a
GPU) with `torch.cuda.set_sync_debug_mode("warn")`, and counts the warnings of every batch after
the warm-up, from its start to the next batch's, with the line that made each:
  - prior: TextImagePrior (the "tiny" preset) on images its frozen VQ tokenizer encodes in the
    step, caption dropout 0.1;
  - tokenizer-vq: the VQ-GAN with an EMA codebook and dead-code restarts;
  - tokenizer-lfq: the VQ-GAN with a lookup-free quantizer.
Sizes do not change the count; the reference is the design's 2.

    python bench/host_syncs.py                        # on a GPU
    python bench/host_syncs.py --tiny --device cpu    # smoke run: a CPU has no syncs to count
"""

from __future__ import annotations

import argparse
import json
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_modules.prior import TextImagePrior
from lightning_modules.vqgan import VQGAN, DiscriminatorConfig, LossConfig
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.lookup_free_quantizer import LookupFreeQuantizer
from tessera.nn.transformer import TransformerConfig
from tessera.nn.vector_quantizer import VectorQuantizer
from tessera.nn.vq_tokenizer import VQTokenizer

SETTINGS = ["prior", "tokenizer-vq", "tokenizer-lfq"]
DESIGNED_SYNCS_PER_STEP = 2  # the non-finite guard, and Lightning's progress-bar read-back of the loss
SYNC_WARNING = "called a synchronizing CUDA operation"


class SyncsPerStep(L.Callback):
    """The CUDA syncs of each training batch after the first `skip` and before the last, each window
    from a batch's start to the next one's: `steps`, a list of {"file:line": count}. Counts nothing
    on a CPU."""

    def __init__(self, skip: int):
        self.skip = skip
        self.steps: list[Counter] = []
        self._recording: warnings.catch_warnings | None = None
        self._caught: list[warnings.WarningMessage] = []
        self._batches = 0

    def _stop(self, keep: bool) -> None:
        if self._recording is None:
            return
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._recording.__exit__(None, None, None)
        self._recording = None
        if keep:
            syncs = [w for w in self._caught if SYNC_WARNING in str(w.message)]
            self.steps.append(Counter(f"{Path(w.filename).name}:{w.lineno}" for w in syncs))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._stop(keep=True)
        self._batches += 1
        if self._batches <= self.skip:
            return
        self._recording = warnings.catch_warnings(record=True)
        self._caught = self._recording.__enter__()
        warnings.simplefilter("always")  # every sync, not the first of each line
        if pl_module.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module):
        self._stop(keep=False)  # its window would take in the end of training

    def on_exception(self, trainer, pl_module, exception):
        self._stop(keep=False)


def count_syncs(module: L.LightningModule, loader: DataLoader, device: str, skip: int, steps: int) -> list[Counter]:
    """The syncs of `steps` training steps of `module` after `skip` warm-up steps, one Counter a step."""
    counter = SyncsPerStep(skip)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device == "cuda" else "32-true", max_steps=skip + steps + 1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[counter],
    )
    trainer.fit(module, loader)
    return counter.steps


class Samples(Dataset):
    """The same few samples over and over, made on the CPU as a loader's would be."""

    def __init__(self, samples: list[dict], length: int):
        self.samples, self.length = samples, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        return self.samples[index % len(self.samples)]


def autoencoder(image_size: int, levels: int) -> AutoencoderConfig:
    return AutoencoderConfig(ch=16, ch_mult=(1,) + (2,) * (levels - 1), num_res_blocks=1, z_channels=16, image_size=image_size)


def images(count: int, size: int) -> torch.Tensor:
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1


def tokenizer_module(name: str, tiny: bool) -> tuple[VQGAN, list[dict]]:
    size = 16 if tiny else 64
    quantizer = (VectorQuantizer(dim=8, codebook_size=256, ema_decay=0.99, dead_code_threshold=1.0)
                 if name == "tokenizer-vq" else LookupFreeQuantizer(dim=10))
    module = VQGAN(quantizer, autoencoder(size, 3), DiscriminatorConfig(ndf=16, n_layers=2),
                   LossConfig(pretrained_lpips=False))
    return module, [{"images": image} for image in images(8, size)]


def prior_module(tiny: bool, work: Path) -> tuple[TextImagePrior, list[dict]]:
    config = TransformerConfig.from_name("tiny", **(dict(n_layer=2, n_embd=64, image_grid=4) if tiny else {}))
    size = 8 * config.image_grid  # an f8 tokenizer gives the prior's grid
    tokenizer = VQTokenizer(autoencoder(size, 4), VectorQuantizer(dim=8, codebook_size=config.image_vocab_size))
    module = TextImagePrior(transformer=config, tokenizer=str(tokenizer.save_pretrained(work / "tokenizer")),
                            caption_dropout=0.1)
    captions = module.captions([f"{n} red circles" for n in range(8)])
    samples = [{"text_ids": captions.ids[i], "text_mask": captions.mask[i], "images": image}
               for i, image in enumerate(images(8, size))]
    return module, samples


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    torch.manual_seed(0)
    module, samples = prior_module(args.tiny, work) if name == "prior" else tokenizer_module(name, args.tiny)
    loader = DataLoader(Samples(samples, length=args.batch_size * (args.warmup + args.steps + 1)), batch_size=args.batch_size)
    steps = count_syncs(module, loader, args.device, args.warmup, args.steps)
    per_step = [sum(step.values()) for step in steps]
    return {
        "setting": name,
        "syncs_per_step": max(per_step, default=0),
        "designed": DESIGNED_SYNCS_PER_STEP,
        "measured_steps": len(steps),
        "sites": dict(sum(steps, Counter())),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=SETTINGS, choices=SETTINGS)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps not counted first (the optimizer's state is made there)")
    parser.add_argument("--steps", type=int, default=3, help="steps counted")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="smaller networks and images: checks the script runs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The header, then one record per setting."""
    yield {"bench": "host_syncs", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
           "torch": torch.__version__, "lightning": L.__version__}
    for name in args.settings:
        with tempfile.TemporaryDirectory() as work:
            yield measure(name, args, Path(work))


def main() -> None:
    for record in run(parse_args()):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

"""VQ-GAN training throughput: images per second through full training steps (a generator step
and a discriminator step per batch) at 256x256 with the taming-size f16 16384-code config.

Runs the real VQGAN LightningModule under a Lightning Trainer on random images already on the
device (the data loader is measured apart, by bench/data_throughput.py), and times the steps
after a warm-up, for each setting:
  - reference: taming-transformers' recipe, fp32, BatchNorm PatchGAN, NCHW, eager;
  - bf16: bf16-mixed autocast, GroupNorm PatchGAN;
  - bf16+channels_last: the same with NHWC weights and images;
  - bf16+channels_last+compile: the same with torch.compile on both networks.
LPIPS runs with random weights (the same FLOPs as the real VGG16) so no download is needed.

    python bench/tokenizer_throughput.py --batch-size 16 --steps 30
    python bench/tokenizer_throughput.py --device cpu --tiny --steps 3    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset

from lightning_modules.vqgan import VQGAN, DiscriminatorConfig, LossConfig
from tessera.nn.autoencoder import AutoencoderConfig
from tessera.nn.vector_quantizer import VectorQuantizer

SETTINGS = {
    "reference": dict(precision="32-true", norm="batch", channels_last=False, compile=False),
    "bf16": dict(precision="bf16-mixed", norm="group", channels_last=False, compile=False),
    "bf16+channels_last": dict(precision="bf16-mixed", norm="group", channels_last=True, compile=False),
    "bf16+channels_last+compile": dict(precision="bf16-mixed", norm="group", channels_last=True, compile=True),
}


class RandomImages(IterableDataset):
    """Endless batches of one random image batch, made once on the device."""

    def __init__(self, batch_size: int, image_size: int, device: str):
        self.images = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1

    def __iter__(self):
        while True:
            yield {"images": self.images}


class StepTimer(L.Callback):
    """Wall time of the training steps after `warmup` steps, synchronised with the device."""

    def __init__(self, warmup: int):
        self.warmup = warmup
        self.started = self.finished = None
        self.timed_steps = 0

    def _sync(self, pl_module):
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.warmup:
            self._sync(pl_module)
            self.started = time.perf_counter()
        elif trainer.global_step > self.warmup:
            self.timed_steps += 1
            self._sync(pl_module)
            self.finished = time.perf_counter()


def build(setting: dict, tiny: bool) -> VQGAN:
    if tiny:
        autoencoder = AutoencoderConfig(ch=16, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=1, z_channels=32, image_size=64)
        quantizer = VectorQuantizer(dim=32, codebook_size=512)
    else:  # configs/tokenizer/taming_f16_16384.yaml
        autoencoder = AutoencoderConfig(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=256, image_size=256)
        quantizer = VectorQuantizer(dim=256, codebook_size=16384)
    return VQGAN(
        quantizer=quantizer,
        autoencoder=autoencoder,
        discriminator=DiscriminatorConfig(ndf=64, n_layers=2, norm=setting["norm"]),
        loss=LossConfig(pretrained_lpips=False, perceptual_weight=1.0, disc_start=0, adaptive_disc_weight=True),
        channels_last=setting["channels_last"],
        compile=setting["compile"],
    )


def measure(name: str, batch_size: int, steps: int, warmup: int, device: str, tiny: bool) -> dict:
    setting = SETTINGS[name]
    torch.manual_seed(0)
    model = build(setting, tiny)
    timer = StepTimer(warmup)
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, precision=setting["precision"],
        max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    image_size = model.tokenizer.config.image_size
    trainer.fit(model, DataLoader(RandomImages(batch_size, image_size, device), batch_size=None))
    seconds = timer.finished - timer.started
    result = {
        "setting": name,
        "batch_size": batch_size,
        "image_size": image_size,
        "timed_steps": timer.timed_steps,
        "images_per_s": round(batch_size * timer.timed_steps / seconds, 1),
        "ms_per_step": round(1000 * seconds / timer.timed_steps, 1),
    }
    if device == "cuda":
        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="timed steps, after the warm-up")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a small network at 64 px: checks the script runs")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> Iterator[dict]:
    """The header, then one result per setting as it is measured."""
    torch.backends.cudnn.benchmark = True  # PyTorch's other defaults stay: the fp32 reference gets TF32 convolutions only
    yield {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__}
    for name in args.settings:
        yield measure(name, args.batch_size, args.steps, args.warmup, args.device, args.tiny)


def main() -> None:
    for record in run(parse_args()):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()

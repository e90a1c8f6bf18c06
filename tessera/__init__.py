"""Tessera: two-stage autoregressive text-to-image generation with PyTorch Lightning.

`tessera/` holds plain PyTorch (networks, sampling, metric math) and knows nothing of the layers
above it: `datamodules/` (data), `lightning_modules/` and `callbacks/` (training), and
`tessera/commands/` (the `tessera` command line), which uses them all.
"""

__version__ = "0.1.0"

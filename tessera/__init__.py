"""Tessera: two-stage autoregressive text-to-image generation with PyTorch Lightning.

`tessera/` holds plain PyTorch (networks, sampling, metric math) and the command line;
`lightning_modules/`, `datamodules/` and `callbacks/` hold the Lightning side.
"""

__version__ = "0.1.0"

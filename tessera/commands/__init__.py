"""The `tessera` verbs: the top layer, which uses every other one (lightning_modules/,
callbacks/, datamodules/ and the plain-PyTorch core in tessera/). Nothing below imports it.

`cli.py` is the entry point; each verb that needs more than a few lines has its own module:
`fit.py` (LightningCLI and run directories), `quickstart.py`, `evaluate_coco.py`,
`evaluate_shapes.py`, `submit.py`.
"""

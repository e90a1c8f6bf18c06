"""The `tessera` verbs: the top layer, which uses every other one (lightning_modules/,
callbacks/, datamodules/ and the plain-PyTorch core in tessera/). Nothing below imports it.

`cli.py` is the entry point; each verb has its own module with `add_parser` and the code it
runs: `shards.py`, `data.py`, `fit.py` (LightningCLI and run directories), `quickstart.py`,
`evaluate_shapes.py`, `evaluate_coco.py`, `sample.py`, `export.py`, `tokenize.py`, `submit.py`.
"""

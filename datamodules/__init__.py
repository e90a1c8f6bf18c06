"""Data for Tessera: shard writers, the WebDataset caption-image pipeline and the text tokenizer.

Nothing here builds a model.
"""

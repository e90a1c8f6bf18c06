"""Caption tokenization: a `transformers` tokenizer, padded or truncated to a fixed length.

The default, "clip-bpe", is CLIP's byte-level BPE (49,408 tokens) built from the vocabulary
file that open_clip_torch ships, so it works offline and needs no model hub. Any other name
or local directory goes to `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import gzip
import html
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import ftfy
import torch
from transformers import AutoTokenizer, CLIPTokenizer, PreTrainedTokenizerBase

CLIP_BPE = "clip-bpe"
# open_clip's vocabulary file holds 262,144 ranked merges; CLIP uses the first 48,894 of them:
# 49,152 tokens minus 256 single bytes and 2 special tokens.
CLIP_NUM_MERGES = 49152 - 256 - 2


@lru_cache(maxsize=8)  # one load per process, however many shards or modules ask (it takes seconds)
def load_text_tokenizer(name_or_path: str = CLIP_BPE) -> PreTrainedTokenizerBase:
    """CLIP's BPE for "clip-bpe", otherwise `AutoTokenizer.from_pretrained(name_or_path)`; one object
    shared by every caller, so none may change it (`new_text_tokenizer` makes one to change)."""
    if name_or_path == CLIP_BPE:
        return _clip_bpe_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path)


def new_text_tokenizer(name_or_path: str = CLIP_BPE) -> PreTrainedTokenizerBase:
    """A tokenizer of the caller's own, to add tokens to: built afresh, because a deep copy of
    CLIP's BPE loses its decoder (ids then decode with every "</w>" left in)."""
    if name_or_path == CLIP_BPE:
        return _clip_bpe_tokenizer.__wrapped__()  # not the cached one
    return AutoTokenizer.from_pretrained(name_or_path)


@lru_cache(maxsize=1)  # one object whether asked for by name or by default
def _clip_bpe_tokenizer() -> CLIPTokenizer:
    vocab_file = resources.files("open_clip") / "bpe_simple_vocab_16e6.txt.gz"
    with vocab_file.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        merges = lines.read().split("\n")[1 : CLIP_NUM_MERGES + 1]  # line 0 is a version header
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    pairs = [tuple(m.split(" ")) for m in merges]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=pairs)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable unicode characters, in CLIP's order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def clean_caption(text: str) -> str:
    """CLIP's caption cleaning: mend mojibake, unescape HTML entities (often twice-escaped in
    scraped alt-texts), collapse whitespace, lowercase. Python's lower() rather than the
    tokenizer's normalizer alone, because only it knows a word-final Greek sigma (as open_clip)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


@dataclass
class TokenizedCaptions:
    ids: torch.Tensor  # (B, L) long, padded with the tokenizer's pad id
    mask: torch.Tensor  # (B, L) bool, True on real tokens
    truncated: int  # captions cut to fit


class CaptionTokenizer:
    """Turns captions into fixed-length id tensors; a caption too long keeps its end-of-text token."""

    def __init__(self, tokenizer: str | PreTrainedTokenizerBase = CLIP_BPE, text_length: int = 64):
        self.tokenizer = load_text_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        if text_length < 2:
            raise ValueError(f"text_length must leave room for the start and end tokens, got {text_length}")
        self.text_length = text_length
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def token_counts(self, captions: list[str]) -> list[int]:
        """Tokens per caption with start and end tokens, before truncation."""
        return [len(ids) for ids in self._encode(captions)]

    def _encode(self, captions: list[str]) -> list[list[int]]:
        if not captions:
            return []
        # split_special_tokens: "<|endoftext|>" typed in an alt-text is text, not a control token
        return self.tokenizer([clean_caption(c) for c in captions], split_special_tokens=True)["input_ids"]

    def __call__(self, captions: list[str]) -> TokenizedCaptions:
        length = self.text_length
        ids = torch.full((len(captions), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), length), dtype=torch.bool)
        truncated = 0
        for row, tokens in enumerate(self._encode(captions)):
            if len(tokens) > length:
                truncated += 1
                tokens = tokens[: length - 1] + tokens[-1:]  # keep the end-of-text token, as CLIP does
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = True
        return TokenizedCaptions(ids, mask, truncated)

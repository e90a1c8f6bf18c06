"""Caption tokenization (datamodules/text.py): CLIP's BPE, padding, truncation, open_clip parity.

The CLIP BPE tokenizer takes a few seconds to build; `load_text_tokenizer` caches it per process,
so every CaptionTokenizer here shares one instance.
"""

from __future__ import annotations

import pytest
import torch

from datamodules.text import CLIP_BPE, CaptionTokenizer, clean_caption, load_text_tokenizer

VOCAB_SIZE, BOS, EOS = 49408, 49406, 49407

CAPTIONS = [
    "A photo of a Cat.",
    "  two   dogs,\tplaying  in the   park!! ",
    "Café crème brûlée at 3:45pm on 12/25/2023",
    "It's the dog's toy; they're OK, we'll see",
    "naïve façade — “quoted” text",
    "Tom &amp; Jerry &lt;3",
    "MiXeD CaSe HeLLo 1234567890",
    "Ångström ÉLAN Über straße",
    "emoji 🐱🐶 and 日本語 テキスト",
    "e = mc^2 + 3.14159",
    "don’t stop, hello\u00a0world",
    "mojibake cafÃ©",
    "",
    "a very long caption " * 30,
]


@pytest.fixture(scope="module")
def clip_tokenizer():
    return load_text_tokenizer()


@pytest.fixture(scope="module")
def tok77(clip_tokenizer) -> CaptionTokenizer:
    return CaptionTokenizer(clip_tokenizer, text_length=77)


@pytest.fixture(scope="module")
def tok8(clip_tokenizer) -> CaptionTokenizer:
    return CaptionTokenizer(clip_tokenizer, text_length=8)


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def real_ids(tokens, row: int) -> list[int]:
    return tokens.ids[row][tokens.mask[row]].tolist()


def test_default_tokenizer_is_clip_bpe_with_49408_tokens(clip_tokenizer):
    assert load_text_tokenizer(CLIP_BPE) is clip_tokenizer  # built once, cached
    assert len(clip_tokenizer) == VOCAB_SIZE
    assert clip_tokenizer.bos_token_id == BOS
    assert clip_tokenizer.eos_token_id == EOS
    assert clip_tokenizer.convert_ids_to_tokens([BOS, EOS]) == ["<|startoftext|>", "<|endoftext|>"]


def test_caption_tokenizer_defaults_to_clip_bpe(tok77, clip_tokenizer):
    assert CaptionTokenizer(text_length=77).tokenizer is clip_tokenizer
    assert tok77.vocab_size == VOCAB_SIZE
    assert tok77.pad_id == EOS


def test_known_caption_ids(tok77):
    # "a photo of a cat" in CLIP's vocabulary
    assert real_ids(tok77(["a photo of a cat"]), 0) == [BOS, 320, 1125, 539, 320, 2368, EOS]


def test_ids_match_open_clip_on_real_tokens(tok77, open_clip_tokenizer):
    ours = tok77(CAPTIONS)
    reference = open_clip_tokenizer(CAPTIONS, context_length=77)
    assert ours.ids.shape == reference.shape == (len(CAPTIONS), 77)
    for row, caption in enumerate(CAPTIONS):
        expected = reference[row][reference[row] != 0].tolist()  # open_clip pads with 0
        assert real_ids(ours, row) == expected, caption
        assert int(ours.mask[row].sum()) == len(expected), caption
    assert ours.truncated == 1


def test_every_row_starts_with_bos_and_ends_with_eos(tok77):
    tokens = tok77(CAPTIONS)
    lengths = tokens.mask.sum(dim=1)
    assert (tokens.ids[:, 0] == BOS).all()
    assert (tokens.ids[torch.arange(len(CAPTIONS)), lengths - 1] == EOS).all()
    # the mask is a prefix: True then False, never True again
    assert (tokens.mask == (torch.arange(77) < lengths[:, None])).all()


def test_uppercase_gives_the_same_ids_as_lowercase(tok77):
    tokens = tok77(["A Large RED Circle", "a large red circle"])
    assert torch.equal(tokens.ids[0], tokens.ids[1])
    assert torch.equal(tokens.mask[0], tokens.mask[1])


def test_html_entities_are_unescaped_like_clip(tok77):
    tokens = tok77(["Tom &amp; Jerry", "Tom & Jerry", "Tom &amp;amp; Jerry", "&lt;b&gt;", "<b>"])
    assert real_ids(tokens, 0) == real_ids(tokens, 1)
    assert real_ids(tokens, 2) == real_ids(tokens, 1)  # twice-escaped alt-text
    assert real_ids(tokens, 3) == real_ids(tokens, 4)
    assert "amp" not in tok77.tokenizer.decode(real_ids(tokens, 0))


def test_whitespace_is_collapsed(tok77):
    tokens = tok77(["  a\t red \n\n circle  ", "a red circle"])
    assert real_ids(tokens, 0) == real_ids(tokens, 1)


def test_clean_caption_mends_mojibake_unescapes_collapses_whitespace_and_lowercases():
    assert clean_caption("  caf\u00c3\u00a9 &amp;amp;  bar\t\n") == "café & bar"
    assert clean_caption("Mixed Case") == "mixed case"


def test_long_caption_is_truncated_to_text_length_and_ends_with_eos(tok8, tok77):
    caption = "one two three four five six seven eight nine ten"
    full = real_ids(tok77([caption]), 0)
    assert len(full) == 12
    tokens = tok8([caption])
    assert tokens.ids.shape == (1, 8)
    assert tokens.mask.all()
    assert tokens.ids[0].tolist() == full[:7] + [EOS]
    assert tokens.truncated == 1


def test_truncated_counts_exactly_the_captions_too_long(tok8):
    # "word" is one token: n words make n + 2 tokens with start and end
    fits, exact, one_over, far_over = "word " * 5, "word " * 6, "word " * 7, "word " * 50
    tokens = tok8(["a cat", fits, exact, one_over, far_over, ""])
    assert tokens.truncated == 3 - 1  # exact fits: 8 tokens in 8 slots
    assert tokens.mask.sum(dim=1).tolist() == [4, 7, 8, 8, 8, 2]
    assert tok8([exact]).truncated == 0
    assert tok8([one_over]).truncated == 1
    assert tok8(["a cat", "a dog"]).truncated == 0


def test_short_captions_are_padded_with_pad_id_and_masked_false(tok8):
    tokens = tok8(["a cat", ""])
    assert tokens.ids.dtype == torch.long
    assert tokens.mask.dtype == torch.bool
    assert tokens.ids[0].tolist() == [BOS, 320, 2368, EOS] + [tok8.pad_id] * 4
    assert tokens.mask[0].tolist() == [True] * 4 + [False] * 4
    assert tokens.ids[1].tolist() == [BOS, EOS] + [tok8.pad_id] * 6
    assert tokens.mask[1].tolist() == [True, True] + [False] * 6


# transformers' fast tokenizer raises IndexError on an empty list; the stream never sends one.
def test_empty_batch_gives_empty_tensors(tok8):
    assert tok8.token_counts([]) == []
    tokens = tok8([])
    assert tokens.ids.shape == tokens.mask.shape == (0, 8)
    assert tokens.truncated == 0


def test_token_counts_are_untruncated_and_include_start_and_end(tok8):
    counts = tok8.token_counts(["a cat", "", "word " * 50, "Tom &amp; Jerry"])
    assert counts == [4, 2, 52, 5]


def test_token_counts_agree_with_the_mask_when_nothing_is_truncated(tok77):
    short = CAPTIONS[:-1]
    assert tok77.token_counts(short) == tok77(short).mask.sum(dim=1).tolist()


def test_text_length_two_keeps_only_start_and_end(clip_tokenizer):
    tokens = CaptionTokenizer(clip_tokenizer, text_length=2)(["a cat", ""])
    assert tokens.ids.tolist() == [[BOS, EOS], [BOS, EOS]]
    assert tokens.truncated == 1


@pytest.mark.parametrize("text_length", [1, 0, -5])
def test_text_length_below_two_raises(clip_tokenizer, text_length):
    with pytest.raises(ValueError, match="text_length"):
        CaptionTokenizer(clip_tokenizer, text_length=text_length)


def test_saved_tokenizer_loads_back_through_auto_tokenizer(clip_tokenizer, tok8, tmp_path):
    clip_tokenizer.save_pretrained(tmp_path)
    loaded = load_text_tokenizer(str(tmp_path))
    assert loaded is not clip_tokenizer
    assert len(loaded) == VOCAB_SIZE
    reloaded = CaptionTokenizer(str(tmp_path), text_length=8)
    assert reloaded.pad_id == tok8.pad_id
    captions = CAPTIONS + ["word " * 7]
    ours, theirs = tok8(captions), reloaded(captions)
    assert torch.equal(ours.ids, theirs.ids)
    assert torch.equal(ours.mask, theirs.mask)
    assert ours.truncated == theirs.truncated
    assert reloaded.token_counts(captions) == tok8.token_counts(captions)


# Greek capital sigma at the end of a word lowercases to final sigma "ς" in Python's str.lower()
# (open_clip) but to "σ" in the tokenizers Lowercase normalizer.
def test_greek_final_sigma_matches_open_clip(tok77, open_clip_tokenizer):
    caption = "ΟΔΥΣΣΕΥΣ"
    reference = open_clip_tokenizer([caption], context_length=77)[0]
    assert real_ids(tok77([caption]), 0) == reference[reference != 0].tolist()


# A scraped caption may contain the literal text "<|endoftext|>": it must stay text, never an
# end-of-text id in the middle of the caption.
def test_special_token_text_in_a_caption_is_not_a_control_token(tok77):
    ids = real_ids(tok77(["a <|endoftext|> b <|startoftext|>"]), 0)
    assert ids[0] == BOS and ids[-1] == EOS
    assert BOS not in ids[1:-1] and EOS not in ids[1:-1]

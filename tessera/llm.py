"""
A `transformers` decoder-only language model whose vocabulary also holds the image tokenizer's
codes, so one network goes both ways: caption to image and image to caption (Chameleon, Liquid).

    vocabulary: [text tokens 0 .. V-1][<boi>][<eoi>][<img_0> .. <img_{K-1}>]
    text to image:  [bos] caption <boi> img * (h*w) <eoi>
    image to text:  [bos] <boi> img * (h*w) <eoi> caption <eos>

The text tokens keep their pretrained rows; the K + 2 new rows of the input and output
embeddings start at the mean of the old ones (`resize_token_embeddings(mean_resizing=True)`),
so the model's text distribution barely moves when they are added. Sampling an image allows
only image codes after <boi> and draws exactly h*w of them; a caption allows only text tokens.

References:
1) Chameleon: Mixed-Modal Early-Fusion Foundation Models, 2024: https://arxiv.org/abs/2405.09818
   (image tokens in the LM's vocabulary, z-loss, image-only decoding between begin and end).
2) Liquid: Language Models are Scalable Multi-modal Generators, 2024: https://arxiv.org/abs/2412.04332
   (a pretrained LLM, vocabulary grown by the codebook with mean resizing, both directions mixed).
3) Hewitt, Initializing New Word Embeddings for Pretrained Language Models, 2021:
   https://nlp.stanford.edu/~johnhew/vocab-expansion.html (why the mean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from torch.nn.utils.rnn import pad_sequence
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from tessera.sampling import SamplingConfig, classifier_free_guidance, filter_logits

BOI, EOI = "<boi>", "<eoi>"
IGNORED, TEXT, IMAGE = 0, 1, 2  # what kind of target each position of a sequence is


def image_token(code: int) -> str:
    return f"<img_{code}>"


# -----------------------------------------------------------------------------
# the backbone and its vocabulary


@dataclass
class BackboneConfig:
    """The language model: a local checkpoint directory, or a config to initialise at random."""

    path: str | None = None
    """A local directory with a `transformers` causal LM and its tokenizer (save_pretrained's layout,
    e.g. a downloaded Hugging Face snapshot); its own tokenizer is used unless `tokenizer` is set."""
    config: dict[str, Any] | None = None
    """Instead of `path`: `model_type` (e.g. "llama") and that config class's arguments; random
    weights. `vocab_size` comes from the tokenizer."""
    tokenizer: str | None = None
    """The text tokenizer: "clip-bpe" or a local tokenizer directory. Needed with `config`."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.config is None):
            raise ValueError("backbone needs exactly one of `path` (a local checkpoint directory) and `config`")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError(f"backbone.config needs a `model_type` (e.g. 'llama'), got keys {sorted(self.config)}")


def load_backbone(
    config: BackboneConfig, tokenizer: PreTrainedTokenizerBase | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The causal LM (fp32: the training precision casts) and its text tokenizer: `tokenizer` when
    given, else the checkpoint directory's own. Nothing is downloaded."""
    if config.path is not None:
        path = Path(config.path)
        if not path.is_dir():
            raise FileNotFoundError(
                f"no language model directory at {path}: backbone.path must be a local directory holding a "
                "`transformers` causal LM and its tokenizer (config.json, weights, tokenizer files), e.g. a "
                "Hugging Face snapshot downloaded beforehand with `hf download NAME --local-dir DIR`"
            )
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(path)
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), tokenizer
    if tokenizer is None:
        raise ValueError("backbone.config needs backbone.tokenizer: the text tokenizer the model's vocabulary is made for")
    options = dict(config.config)
    given = options.pop("vocab_size", len(tokenizer))
    if given != len(tokenizer):
        raise ValueError(f"backbone.config sets vocab_size {given} but its tokenizer has {len(tokenizer)} tokens: leave vocab_size out")
    model_config = AutoConfig.for_model(options.pop("model_type"), vocab_size=len(tokenizer), **options)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32), tokenizer


@dataclass(frozen=True)
class ImageVocabulary:
    """Where the image tokens sit among the model's ids: <boi>, <eoi>, then one id per code."""

    text_vocab_size: int
    codebook_size: int

    @property
    def boi(self) -> int:
        return self.text_vocab_size

    @property
    def eoi(self) -> int:
        return self.text_vocab_size + 1

    @property
    def first_code(self) -> int:
        return self.text_vocab_size + 2

    @property
    def size(self) -> int:
        return self.first_code + self.codebook_size


def add_image_tokens(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, codebook_size: int) -> ImageVocabulary:
    """Adds <boi>, <eoi> and one token per code to `tokenizer` (in place) and grows the model's
    input and output embeddings to match, tied or not as the model is; the text rows are kept.

    A tokenizer that already has them (an export) is checked and left as it is."""
    added = [BOI, EOI] + [image_token(code) for code in range(codebook_size)]
    if BOI in tokenizer.get_vocab():
        vocab = ImageVocabulary(tokenizer.convert_tokens_to_ids(BOI), codebook_size)
        _check_image_ids(tokenizer, added, vocab)
        rows = model.get_input_embeddings().num_embeddings
        if rows != vocab.size:
            raise ValueError(f"the model has {rows} embedding rows but its tokenizer's image tokens end at id {vocab.size}")
        return vocab
    vocab = ImageVocabulary(len(tokenizer), codebook_size)
    rows = model.get_input_embeddings().num_embeddings
    if rows < vocab.text_vocab_size:
        raise ValueError(f"the tokenizer has {vocab.text_vocab_size} tokens but the model only {rows} embedding rows")
    # special: never split from the text around them, dropped by decode(skip_special_tokens=True)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in added], special_tokens=True)
    _check_image_ids(tokenizer, added, vocab)
    if rows > vocab.text_vocab_size:
        # rows past the tokenizer's last id (checkpoints pad the vocabulary) belong to no token:
        # dropped, so the new tokens' ids and rows start right after the text's
        model.resize_token_embeddings(vocab.text_vocab_size, mean_resizing=False)
    # shapes only under the meta device: there are no old rows to average
    mean = model.get_input_embeddings().weight.device.type != "meta"
    model.resize_token_embeddings(vocab.size, mean_resizing=mean)
    return vocab


def _check_image_ids(tokenizer: PreTrainedTokenizerBase, added: list[str], vocab: ImageVocabulary) -> None:
    ids = tokenizer.convert_tokens_to_ids(added)
    if ids != list(range(vocab.boi, vocab.size)):
        raise ValueError(
            f"the image tokens must have the consecutive ids {vocab.boi}..{vocab.size - 1}, but the tokenizer "
            f"gave {ids[:3]}...: it already holds some of {added[:3]}..."
        )


# -----------------------------------------------------------------------------
# training sequences and their loss


def build_sequences(
    captions: list[list[int]],
    codes: torch.Tensor,
    image_to_text: torch.Tensor,
    vocab: ImageVocabulary,
    bos: int | None,
    eos: int,
    pad: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both directions in one right-padded batch.

    captions: per row the caption's token ids, without special tokens; codes (B, N) image codes;
    image_to_text (B,) bool: which rows caption their image instead of drawing it.
    Returns input_ids (B, L) and kinds (B, L): what each position is as a target (IGNORED, TEXT or
    IMAGE); the first position and the padding are never targets."""
    prefix = [bos] if bos is not None else []
    rows, kinds = [], []
    image_ids = codes + vocab.first_code  # (B, N)
    for caption, ids, to_text in zip(captions, image_ids, image_to_text.tolist()):
        image = [vocab.boi, *ids.tolist(), vocab.eoi]
        if to_text:  # the caption is the target, the image only its context
            row = prefix + image + caption + [eos]
            kind = [IGNORED] * (len(prefix) + len(image)) + [TEXT] * (len(caption) + 1)
        else:  # the caption keeps the LM's language; <boi>, the codes and <eoi> are the image's targets
            row = prefix + caption + image
            kind = [IGNORED] * len(prefix) + [TEXT] * len(caption) + [IMAGE] * len(image)
        rows.append(torch.tensor(row))
        kinds.append(torch.tensor(kind))
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad).to(codes.device)
    kinds = pad_sequence(kinds, batch_first=True, padding_value=IGNORED).to(codes.device)
    return input_ids, kinds


def sequence_loss(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    kinds: torch.Tensor,
    text_weight: float = 1.0,
    image_weight: float = 1.0,
    z_loss_weight: float = 0.0,
) -> dict[str, torch.Tensor]:
    """Next-token cross-entropy (fp32) over the targets of `build_sequences`' batch.

    text_loss and image_loss are the means over their kinds' targets; loss = (w_t * text_loss +
    w_i * image_loss) / (w_t + w_i), over the kinds the batch has, plus z_loss_weight * z_loss,
    the mean of log^2 Z over all targets (Chameleon: it keeps the softmax normaliser near 1, whose
    drift made their large runs diverge)."""
    targets = input_ids[:, 1:]  # (B, L - 1)
    kinds = kinds[:, 1:]
    chosen = kinds != IGNORED
    # (M, V): only the targets' rows reach fp32, at the cost of one host sync for the selection
    logits = logits[:, :-1][chosen].float()
    targets, kinds = targets[chosen], kinds[chosen]  # (M,)
    log_z = torch.logsumexp(logits, dim=-1)  # (M,)
    cross_entropy = log_z - logits.gather(1, targets[:, None]).squeeze(1)
    losses, total, weights = {}, 0.0, 0.0
    for name, kind, weight in (("text_loss", TEXT, text_weight), ("image_loss", IMAGE, image_weight)):
        of_kind = (kinds == kind).float()
        count = of_kind.sum()
        losses[name] = (cross_entropy * of_kind).sum() / count.clamp(min=1)
        present = weight * (count > 0).float()  # a batch without one kind weighs the other alone
        total, weights = total + present * losses[name], weights + present
    losses["z_loss"] = log_z.square().mean()
    losses["loss"] = total / weights + z_loss_weight * losses["z_loss"]
    return losses


# -----------------------------------------------------------------------------
# sampling


def left_padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of unequal length right-aligned, so every row's next token is the last column:
    ids (R, L) and attention mask (R, L), 0 on the padding."""
    length = max(len(row) for row in rows)
    ids = torch.full((len(rows), length), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, length - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def decode(
    model: PreTrainedModel,
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    draw: Callable[[torch.Tensor], torch.Tensor],
    use_cache: bool = True,
) -> torch.Tensor:
    """`steps` tokens after left-padded prompts ids (R, L): draw maps the last position's logits
    (R, V) to (B,) ids, R a multiple of B (guidance's unconditional rows follow the conditional
    ones and take the same token). Returns (B, steps).

    With the KV cache (the model's `cache`) each step feeds one token; without it the whole sequence
    is run again every step (the slow reference). Positions count real tokens only, so a prompt's
    positions do not depend on the padding its batch needs."""
    rows = ids.size(0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, L)
    cache, step_ids, step_positions = None, ids, positions
    tokens = []
    for i in range(steps):
        out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                    cache=cache, use_cache=use_cache)
        token = draw(out.logits[:, -1])  # (B,)
        tokens.append(token)
        if i + 1 == steps:  # the last token is never an input
            break
        token = token.repeat(rows // token.size(0))[:, None]  # (R, 1)
        next_position = positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        positions = torch.cat([positions, next_position], 1)
        if use_cache:
            cache, step_ids, step_positions = out.cache, token, next_position
        else:
            step_ids, step_positions = torch.cat([step_ids, token], 1), positions
    return torch.stack(tokens, 1)


def sample_image_codes(
    model: PreTrainedModel,
    vocab: ImageVocabulary,
    prompts: list[list[int]],
    n_codes: int,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    null_prompt: list[int] | None = None,
    pad: int = 0,
    use_cache: bool = True,
) -> torch.Tensor:
    """(B, n_codes) image codes in [0, K) after each prompt (its ids up to the caption's end; <boi>
    is added here). Only image codes can follow <boi>, and exactly n_codes of them are drawn: the
    logits are cut to the code ids, the same as setting every other token's to -inf.

    Guidance (config.cfg_scale != 1) contrasts with `null_prompt`, the empty caption's ids, whose
    rows join the batch; one multinomial draw per position for all rows at once, so a seeded
    generator gives the same codes with the cache or without."""
    config = config or SamplingConfig()
    guided = config.cfg_scale != 1.0  # at 1 guidance is the conditional logits: no extra rows
    rows = [prompt + [vocab.boi] for prompt in prompts]
    if guided:
        if null_prompt is None:
            raise ValueError(f"cfg_scale={config.cfg_scale} needs null_prompt, the empty caption's prompt ids")
        rows += [null_prompt + [vocab.boi]] * len(prompts)
    device = model.get_input_embeddings().weight.device
    ids, mask = left_padded(rows, pad, device)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, vocab.first_code : vocab.size].float()  # (R, K)
        if guided:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(cond, uncond, config.cfg_scale)
        probs = filter_logits(logits, config).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1) + vocab.first_code

    return decode(model, ids, mask, n_codes, draw, use_cache) - vocab.first_code


def generate_text(
    model: PreTrainedModel,
    vocab: ImageVocabulary,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: int,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    pad: int = 0,
) -> list[list[int]]:
    """Text token ids after each prompt, up to (without) <eos> or max_new_tokens: greedy when
    `config` is None, else drawn with its temperature, top-k and top-p (no guidance). Only text
    tokens can be drawn: a caption holds no image token."""
    device = model.get_input_embeddings().weight.device
    ids, mask = left_padded(prompts, pad, device)

    def draw(logits: torch.Tensor) -> torch.Tensor:
        logits = logits[:, : vocab.text_vocab_size].float()  # (B, V)
        if config is None:
            return logits.argmax(dim=-1)
        probs = filter_logits(logits, config).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

    tokens = decode(model, ids, mask, max_new_tokens, draw).tolist()
    return [row[: row.index(eos)] if eos in row else row for row in tokens]

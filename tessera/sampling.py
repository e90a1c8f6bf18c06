"""
Sampling image tokens from the prior, one at a time: classifier-free guidance, temperature, top-k
and top-p on the logits, then one seeded multinomial draw per image position.

    captions (B, T) --guidance: + B empty-caption rows--> (2B, T) --prefill--> logits for token 0
    for image token i = 0 .. N-1:
        guide -> / temperature -> top-k -> top-p -> softmax -> multinomial -> token i
        decode_step(token i) -> logits for token i + 1              (KV cache, static shapes)

    a pixel model's (B, 3*H*W) subpixels (tessera/nn/subpixels.py): steps = subpixel_steps(captions)
    for subpixel i = 0 .. 3HW-1:
        steps.log_probs() -> guide -> ... -> value i -> steps.push(value i)   (what a coder steps through)

    an RQTransformer's (B, N, D) codes: prefill -> the context of position 0
    for position t = 0 .. N-1:
        for code d = 0 .. D-1: depth_step(context, codes 0 .. d-1) -> guide -> ... -> code d  (depth KV cache)
        decode_step(the D codes of t) -> the context of position t + 1    (spatial KV cache)

The loops are generators (`image_token_steps`, the `Steps` protocol): they yield each step's logits
and are sent the ids chosen, so the same loop serves the sampler (which draws them) and the range
coder of tessera/coding.py (which reads them from the ids it codes or decodes).

References:
1) Classifier-Free Diffusion Guidance, Ho & Salimans 2021: https://arxiv.org/abs/2207.12598; on the
   logits of an autoregressive prior as Make-A-Scene (https://arxiv.org/abs/2203.13131) and
   LlamaGen (https://arxiv.org/abs/2406.06525), the conditional and unconditional rows in one batch.
2) The Curious Case of Neural Text Degeneration (top-p), Holtzman et al. 2019:
   https://arxiv.org/abs/1904.09751
3) transformers' TopK, TopP and ClassifierFreeGuidance logits processors, which the tests match.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from tessera.nn.image_transformer import ImageTransformer
from tessera.nn.pixelcnn import PixelCNN
from tessera.nn.rq_transformer import RQTransformer
from tessera.nn.transformer import TextImageTransformer


def filter_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Sets every logit below the k-th largest of its row to -inf (ties with the k-th all stay)."""
    if k < 1:
        raise ValueError(f"top-k needs k >= 1, got {k}")
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def filter_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filtering: keeps the smallest set of most likely tokens whose probability reaches p
    and sets the rest to -inf. The most likely token always stays.

    The probabilities and their running sum are fp64 whatever the logits' dtype: over a near-uniform
    row of V ids the cumulative mass moves by ~1/V a token, near the rounding error an fp32 running
    sum gathers, and fp32 kept or dropped the boundary token against an fp64 count in 0.7% of such
    rows at V = 16,384 and 4% at 65,536 (p 0.9)."""
    if not 0.0 < p <= 1.0:
        raise ValueError(f"top-p needs 0 < p <= 1, got {p}")
    if p == 1.0:  # keep all: a cumulative sum that rounds to 1 early must not drop the tail
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.double().softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_above >= p  # the set had reached p without it; the top token has 0 above
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond): 1 is the conditional logits, above 1 pushes past them."""
    return uncond + scale * (cond - uncond)


@dataclass
class SamplingConfig:
    """How each image token is drawn. Defaults: minDALL-E's top-k 256 at temperature 1, no guidance."""

    top_k: int | None = 256
    """Keep the k most likely image tokens at every step; None keeps all."""
    top_p: float | None = None
    """Keep the most likely tokens up to this probability mass, in (0, 1]; None keeps all."""
    temperature: float = 1.0
    """Divides the logits: below 1 sharper, above 1 flatter."""
    cfg_scale: float = 1.0
    """Classifier-free guidance: 1 is plain conditional sampling (no unconditional pass); above 1
    pushes the logits away from the empty caption's and needs `null_text_ids`."""

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1] or be None, got {self.top_p}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0 (0: unconditional, 1: no guidance), got {self.cfg_scale}")


SAMPLING_FIELDS = ("top_k", "top_p", "temperature", "cfg_scale")


def with_overrides(base: SamplingConfig | None, **given: Any) -> tuple[SamplingConfig, dict[str, str]]:
    """`base` (a prior's recorded settings; None: SamplingConfig's defaults) with every value in
    `given` that is not None put over it, and where each field's value came from: "given",
    "prior" or "default". top_k 0 and top_p 1 given mean keep every token."""
    values, sources = asdict(base if base is not None else SamplingConfig()), {}
    for name in SAMPLING_FIELDS:
        if given.get(name) is not None:
            values[name], sources[name] = given[name], "given"
        else:
            sources[name] = "prior" if base is not None else "default"
    values["top_k"] = values["top_k"] or None
    values["top_p"] = None if values["top_p"] == 1 else values["top_p"]
    return SamplingConfig(**values), sources


def filter_logits(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p, in transformers' order."""
    logits = logits / config.temperature
    if config.top_k is not None:
        logits = filter_top_k(logits, config.top_k)
    if config.top_p is not None:
        logits = filter_top_p(logits, config.top_p)
    return logits


def sample_image_tokens(
    model: TextImageTransformer,
    text_ids: torch.Tensor,
    config: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    null_text_ids: torch.Tensor | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """Draws (B, image_length) long image ids for captions text_ids (B, text_length); from an
    RQTransformer (B, image_length, code_depth): position by position with the spatial KV cache,
    and at each position its D codes in depth order, each from the depth transformer's logits;
    from a pixel model (PixelCNN, ImageTransformer) (B, 3*H*W) subpixels in raster order, through
    its `subpixel_steps` (a PixelCNN has no cache: one forward per subpixel either way).

    Reproducible: one `torch.multinomial(generator=...)` draw per image token (per code) for all
    rows at once, in order, so a seeded generator (on the model's device) gives the same images
    with the cache or without. With `config.cfg_scale != 1`, `null_text_ids` (text_length,), the
    tokenized empty caption, is required; its rows join the batch, so one forward pass serves both
    (through both of an RQTransformer's transformers). `use_cache=False` reruns the full forward
    over the growing sequence at every step: the slow reference. Runs in eval mode (restored after)
    in the model's dtype; autocast is the caller's.
    """
    config = SamplingConfig() if config is None else config
    device = next(model.parameters()).device
    if generator is not None and generator.device.type != device.type:
        raise ValueError(f"the generator is on {generator.device} but the model on {device}: make it there")
    text_ids = text_ids.to(device)
    batch_size = text_ids.size(0)
    guided = config.cfg_scale != 1.0  # at 1 guidance is the conditional logits: skip the extra rows
    if guided:
        if null_text_ids is None:
            raise ValueError(
                f"cfg_scale={config.cfg_scale} needs null_text_ids, the tokenized empty caption of shape "
                "(text_length,): CaptionTokenizer(text_length=...)([''])'s ids[0]"
            )
        if null_text_ids.shape != (text_ids.size(1),):
            raise ValueError(f"null_text_ids must be ({text_ids.size(1)},), got {tuple(null_text_ids.shape)}")
        null_rows = null_text_ids.to(text_ids).expand(batch_size, -1)
        text_ids = torch.cat([text_ids, null_rows])  # (2B, T): conditional rows, then unconditional

    def draw(logits: torch.Tensor) -> torch.Tensor:
        """(B or 2B, padded vocab) logits -> (B,) ids."""
        # slicing off the head's padding columns: those ids do not exist and can never be drawn
        logits = logits[:, : model.config.image_vocab_size].float()
        if guided:
            cond, uncond = logits.chunk(2)
            logits = classifier_free_guidance(cond, uncond, config.cfg_scale)
        probs = filter_logits(logits, config).softmax(dim=-1)
        return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)

    with torch.inference_mode(), eval_mode(model):
        return run_steps(image_token_steps(model, text_ids, batch_size, use_cache), draw)


Steps = Generator[torch.Tensor, torch.Tensor, torch.Tensor]
"""An autoregressive model, one symbol at a time: the generator yields the logits (rows, >= K) of
the next symbol of every row (log-probabilities up to a constant; the first K columns are the
alphabet), is sent the (B,) symbols chosen for them, and returns all the symbols once the last
is chosen. Sampling chooses by drawing, the range coder (tessera/coding.py)
by reading the symbols it codes or decodes; the model cannot tell which."""


def run_steps(steps: Steps, choose: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Drives `steps` to the end, sending it `choose(logits)` at every step; returns what it returns."""
    logits = next(steps)
    while True:
        symbols = choose(logits)
        try:
            logits = steps.send(symbols)
        except StopIteration as end:
            return end.value


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """The model in eval mode inside, in its own mode again after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def image_token_steps(
    model: TextImageTransformer, text_ids: torch.Tensor, batch_size: int | None = None, use_cache: bool = True
) -> Steps:
    """A prior's image tokens as `Steps` for captions text_ids (rows, text_length): its logits
    (rows, padded_image_vocab_size) for each image token in row-major order, for each code of an
    RQTransformer position by position, then depth by depth, for each subpixel of a pixel model
    (PixelCNN, ImageTransformer: log-probabilities (rows, 256)) in raster order over (row, col,
    channel); it returns (B, image_length) ids, (B, image_length, code_depth), or (B, 3*H*W). The B = `batch_size` (default: all rows) ids sent at a step are
    repeated over the rows after the first B: guidance's empty-caption rows take the same tokens.
    With the cache: prefill, then one decode step per token; without: the full forward over the
    growing sequence at every step. The caller sets eval mode and no_grad."""
    batch_size = text_ids.size(0) if batch_size is None else batch_size
    if isinstance(model, (PixelCNN, ImageTransformer)):  # a PixelCNN has no cache: one forward a step either way
        return _subpixel_steps(model, text_ids, batch_size, use_cache)
    if isinstance(model, RQTransformer):
        loop = _residual_steps_cached if use_cache else _residual_steps_uncached
    else:
        loop = _steps_cached if use_cache else _steps_uncached
    return loop(model, text_ids, batch_size)


def _steps_cached(model: TextImageTransformer, text_ids: torch.Tensor, batch_size: int) -> Steps:
    n_image, text_length = model.config.image_length, model.config.text_length
    tokens = torch.empty(batch_size, n_image, dtype=torch.long, device=text_ids.device)
    cache = model.make_kv_cache(text_ids.size(0))
    # positions as device tensors, made once: no host-to-device copy and no Python int in a step
    positions = torch.arange(text_length, text_length + n_image, device=text_ids.device)
    logits = model.prefill(text_ids, cache)  # (B or 2B, Vi)
    for i in range(n_image):
        tokens[:, i] = yield logits
        if i + 1 < n_image:  # the last token is never an input
            step_ids = tokens[:, i].repeat(text_ids.size(0) // batch_size)  # the same token for the null rows
            logits = model.decode_step(step_ids, positions[i], cache)
    return tokens


def _steps_uncached(model: TextImageTransformer, text_ids: torch.Tensor, batch_size: int) -> Steps:
    n_image = model.config.image_length
    tokens = torch.zeros(batch_size, n_image, dtype=torch.long, device=text_ids.device)
    for i in range(n_image):
        # tokens[:, i] is a placeholder: forward never feeds the last image token, it predicts it
        image_ids = tokens[:, : i + 1].repeat(text_ids.size(0) // batch_size, 1)
        _, image_logits = model(text_ids, image_ids)  # (B or 2B, i + 1, Vi)
        tokens[:, i] = yield image_logits[:, -1]
    return tokens


def _subpixel_steps(model: PixelCNN | ImageTransformer, text_ids: torch.Tensor, batch_size: int, use_cache: bool) -> Steps:
    steps = model.subpixel_steps(text_ids, use_cache) if isinstance(model, ImageTransformer) else model.subpixel_steps(text_ids)
    for _ in range(steps.length):
        values = yield steps.log_probs()  # (rows, 256)
        steps.push(values.repeat(text_ids.size(0) // batch_size))  # the same value for the null rows
    return steps.values[:batch_size]  # (B, 3*H*W)


def _residual_steps_cached(model: RQTransformer, text_ids: torch.Tensor, batch_size: int) -> Steps:
    n_image, depth, text_length = model.config.image_length, model.config.code_depth, model.config.text_length
    tokens = torch.empty(batch_size, n_image, depth, dtype=torch.long, device=text_ids.device)
    repeats = text_ids.size(0) // batch_size  # the null rows take the same codes
    cache, depth_cache = model.make_kv_cache(text_ids.size(0)), model.make_depth_cache(text_ids.size(0))
    positions = torch.arange(text_length, text_length + n_image, device=text_ids.device)
    context = model.prefill(text_ids, cache)  # (B or 2B, C): of image position 0
    for t in range(n_image):
        for d in range(depth):
            tokens[:, t, d] = yield model.depth_step(context, tokens[:, t, :d].repeat(repeats, 1), depth_cache)
        if t + 1 < n_image:  # the last position's codes are never a spatial input
            context = model.decode_step(tokens[:, t].repeat(repeats, 1), positions[t], cache)
    return tokens


def _residual_steps_uncached(model: RQTransformer, text_ids: torch.Tensor, batch_size: int) -> Steps:
    n_image, depth = model.config.image_length, model.config.code_depth
    tokens = torch.zeros(batch_size, n_image, depth, dtype=torch.long, device=text_ids.device)
    for t in range(n_image):
        for d in range(depth):
            # the codes after (t, d) are placeholders: causal over positions and depths, no logit reads them
            _, image_logits = model(text_ids, tokens.repeat(text_ids.size(0) // batch_size, 1, 1))  # (B or 2B, N, D, Vi)
            tokens[:, t, d] = yield image_logits[:, t, d]
    return tokens

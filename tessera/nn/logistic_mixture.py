"""
The discretised logistic mixture of PixelCNN++: a pixel's three subpixels from one mixture of K
components, each a logistic per channel whose means depend linearly on the earlier channels.

    x_c = v_c / 127.5 - 1 in [-1, 1] for the value v_c in [0, 255] of channel c
    component k:  mu_R = m_R,  mu_G = m_G + alpha x_R,  mu_B = m_B + beta x_R + gamma x_G   (scale s_{c,k})
    P(v_c | k)  = the logistic's mass on [x_c - 1/255, x_c + 1/255]; bin 0 from -inf, bin 255 to +inf
    P(pixel)    = sum_k pi_k prod_c P(v_c | k, v_<c)

Per subpixel (what sampling and coding need), channel c given the channels before it is the same
mixture with the components reweighted by how well each explained those channels:

    P(v_c | v_<c) = sum_k w_k P(v_c | k, v_<c),   w_k proportional to pi_k prod_{c' < c} P(v_c' | k)

so the three conditionals multiply to P(pixel) exactly, and each sums to 1 over its 256 bins.

A bin's mass, sigma(b) - sigma(a) for the edges a < b (already divided by the scale), is taken in
log space as b + log(1 - e^(a - b)) - softplus(a) - softplus(b), which neither cancels when both
edges sit far in a tail nor underflows for a narrow logistic: no fallback to the density is needed,
unlike the reference.

Parameters per pixel, channels last (..., 10 K): K mixture logits, then 3 K means, 3 K log-scales
and 3 K coefficients (alpha, beta, gamma; tanh), each block channel-major.

References:
1) PixelCNN++, Salimans et al. 2017: https://arxiv.org/abs/1701.05517
   https://github.com/openai/pixel-cnn/blob/master/pixel_cnn_pp/nn.py (discretized_mix_logistic_loss)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_LOG_SCALE = -7.0  # PixelCNN++: keeps the logistic from collapsing inside one bin
HALF_BIN = 1.0 / 255.0  # half a bin's width in [-1, 1]


def mixture_params(n_mixtures: int) -> int:
    """Parameters per pixel: K logits, and 3 K each of means, log-scales and coefficients."""
    return 10 * n_mixtures


def _split(params: torch.Tensor, n_mixtures: int) -> tuple[torch.Tensor, ...]:
    """(..., 10 K) -> log pi (..., K), means, log-scales, coefficients (..., 3, K), in fp32."""
    K = n_mixtures
    params = params.float()
    log_pi = params[..., :K].log_softmax(dim=-1)
    rest = params[..., K:].unflatten(-1, (3, 3, K))  # (..., [means, log-scales, coefficients], channel, K)
    means, log_scales, coefficients = rest.unbind(dim=-3)
    return log_pi, means, log_scales.clamp_min(MIN_LOG_SCALE), torch.tanh(coefficients)


def _channel_means(means: torch.Tensor, coefficients: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each channel's component means (..., 3, K), moved by the earlier channels' values x (..., 3) in [-1, 1]."""
    x_r, x_g = x[..., 0, None], x[..., 1, None]  # (..., 1)
    alpha, beta, gamma = coefficients.unbind(dim=-2)  # (..., K) each
    return torch.stack(
        [means[..., 0, :], means[..., 1, :] + alpha * x_r, means[..., 2, :] + beta * x_r + gamma * x_g], dim=-2
    )


def _log_bin_mass(values: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """log P(v) under logistic(means, exp(log_scales)) discretised to 256 bins; all broadcast."""
    x = values / 127.5 - 1.0
    inv_scale = torch.exp(-log_scales)
    upper = (x - means + HALF_BIN) * inv_scale  # b
    lower = (x - means - HALF_BIN) * inv_scale  # a
    middle = upper + torch.log(-torch.expm1(lower - upper)) - F.softplus(lower) - F.softplus(upper)
    # every branch is finite everywhere, so the unused ones give no NaN gradients through `where`
    return torch.where(values == 0, F.logsigmoid(upper), torch.where(values == 255, F.logsigmoid(-lower), middle))


def mixture_log_likelihood(params: torch.Tensor, values: torch.Tensor, n_mixtures: int) -> torch.Tensor:
    """log P(pixel) (...,) of integer values (..., 3) in [0, 255] under params (..., 10 K)."""
    log_pi, means, log_scales, coefficients = _split(params, n_mixtures)
    values = values.float()
    means = _channel_means(means, coefficients, values / 127.5 - 1.0)
    per_channel = _log_bin_mass(values[..., None], means, log_scales)  # (..., 3, K)
    return torch.logsumexp(log_pi + per_channel.sum(dim=-2), dim=-1)


def mixture_subpixel_log_probs(params: torch.Tensor, values: torch.Tensor, n_mixtures: int) -> torch.Tensor:
    """log P(v_c = j | v_<c) (..., 3, 256) for each channel c and value j, given the pixel's values
    (..., 3) (channel c's row reads only the channels before c)."""
    log_pi, means, log_scales, coefficients = _split(params, n_mixtures)
    values = values.float()
    means = _channel_means(means, coefficients, values / 127.5 - 1.0)
    observed = _log_bin_mass(values[..., None], means, log_scales)  # (..., 3, K)
    # components reweighted by the channels before c: exclusive cumulative sum over channels
    before = observed.cumsum(dim=-2) - observed
    log_w = (log_pi[..., None, :] + before).log_softmax(dim=-1)  # (..., 3, K)
    bins = torch.arange(256, device=params.device, dtype=torch.float32)
    per_bin = _log_bin_mass(bins, means[..., None], log_scales[..., None])  # (..., 3, K, 256)
    return torch.logsumexp(log_w[..., None] + per_bin, dim=-2)  # (..., 3, 256)

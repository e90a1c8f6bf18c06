"""Gradient-norm clipping that works with fused optimizers under bf16-mixed.

Lightning's mixed-precision plugin refuses to clip for any optimizer that can unscale gradients
inside its own step, fused Adam and AdamW among them, whatever the precision. That matters for
fp16's gradient scaler only (the gradients would be clipped while still scaled); bf16-mixed has
no scaler, so its gradients are clipped as they are, as Lightning does in fp32.
"""

from __future__ import annotations

import lightning as L
import torch


def clip_grad_norm(module: L.LightningModule, optimizer: torch.optim.Optimizer, max_norm: float) -> None:
    """Scale the gradients of `optimizer`'s parameters so that their total norm is at most `max_norm`."""
    if getattr(module.trainer.precision_plugin, "scaler", None) is not None:
        # fp16: Lightning unscales first, or says why it cannot
        module.clip_gradients(optimizer, max_norm, gradient_clip_algorithm="norm")
        return
    params = [param for group in optimizer.param_groups for param in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, max_norm)

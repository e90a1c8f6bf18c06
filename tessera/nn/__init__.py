"""Plain PyTorch networks: tokenizer, quantizers, discriminator, perceptual loss, transformers (flat, RQ)."""

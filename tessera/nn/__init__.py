"""Plain PyTorch networks: tokenizer, quantizers, discriminator, perceptual loss, transformer."""

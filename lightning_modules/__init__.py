"""One LightningModule per stage: build the networks, define the steps, configure optimizers, log."""

"""The trainer: NiN on Fashion-MNIST (data, on-device pipeline, presets, the loop, checkpoints,
DDP, evaluation)."""

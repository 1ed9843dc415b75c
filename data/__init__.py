"""Data preparation: MNIST (offline-capable) and, later, FFDNet image sets."""

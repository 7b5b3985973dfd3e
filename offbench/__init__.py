"""offbench: a PyTorch Lightning benchmark suite for offline reinforcement learning."""

__version__ = "0.1.0"

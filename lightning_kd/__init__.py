"""lightning-kd: knowledge distillation of transformers as PyTorch Lightning parts."""

__version__ = "0.1.0"

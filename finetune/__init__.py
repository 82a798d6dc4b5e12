"""finetune: LoRA fine-tuning of video diffusion transformers on consumer GPUs."""

__version__ = "0.1.0"

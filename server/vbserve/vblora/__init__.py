"""VB-LoRA math for serving and training: kernels (`ops`), composition, multi-adapter layers."""

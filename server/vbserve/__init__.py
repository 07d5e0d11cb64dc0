"""vbserve: the service (HTTP API, engine, VB-LoRA kernels, training)."""

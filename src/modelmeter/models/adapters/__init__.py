"""LoRA adapters served on a shared base: artifacts, resident pages, the multi-adapter linear, the backend."""

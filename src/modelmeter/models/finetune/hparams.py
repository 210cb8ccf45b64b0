"""The fine-tuning defaults and bounds (torch-free: the API validates jobs against them without loading torch).

The values were chosen by measurement: ``bench/finetune.py``, with the table in the README.
"""

from __future__ import annotations

FULL_BASE_LEARNING_RATE = 1e-4
LORA_BASE_LEARNING_RATE = 1e-3
DEFAULT_LORA_RANK = 8
DEFAULT_LORA_ALPHA = 16
LORA_DROPOUT = 0.1
MAX_LORA_RANK = 64
DEFAULT_N_EPOCHS = 3
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE_MULTIPLIER = 1.0

__all__ = [
           "DEFAULT_BATCH_SIZE",
           "DEFAULT_LEARNING_RATE_MULTIPLIER",
           "DEFAULT_LORA_ALPHA",
           "DEFAULT_LORA_RANK",
           "DEFAULT_N_EPOCHS",
           "FULL_BASE_LEARNING_RATE",
           "LORA_BASE_LEARNING_RATE",
           "LORA_DROPOUT",
           "MAX_LORA_RANK",
]

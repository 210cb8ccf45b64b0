"""modelmeter: a metered model-API platform for fine-tuned BERT models."""

__version__ = "0.1.0"

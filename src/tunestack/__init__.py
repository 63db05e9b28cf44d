"""tunestack: the whole fine-tuning pipeline for a domain chat model."""

__version__ = "0.1.0"

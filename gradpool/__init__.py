"""gradpool: train one language model across many untrusted machines."""

__version__ = "0.1.0"

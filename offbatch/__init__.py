"""offbatch: offline batch LLM inference on one memory-constrained GPU."""

__version__ = "0.1.0"

"""anchorkv: an OpenAI-compatible inference server built around a prompt-prefix KV cache."""

__version__ = "0.1.0"

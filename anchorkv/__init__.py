"""anchorkv: an OpenAI-compatible inference server built around a prompt-prefix KV cache."""

import os

__version__ = "0.1.0"

# torch's oneDNN matmuls keep a compiled primitive per shape in two LRU caches (ideep's and oneDNN's), 1024
# entries each by default; prompt lengths vary without end, so memory grew until both were full. 128 entries
# hold every shape a step reuses (the soak in docs/benchmarks.md). Set before torch's first matmul; a value
# in the environment wins.
os.environ.setdefault("LRU_CACHE_CAPACITY", "128")
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "128")

"""Engine: the model math, sharding plans, collectives, KV cache and the worker loop.

Knows nothing of HTTP, mDNS, SQLite or Gradio (see DESIGN.md)."""

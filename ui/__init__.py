"""The Gradio web UI (a later issue)."""

"""The Gradio web UI: `app.create_ui(pool)` builds the page over the running pool (`llmd.app.pool`)."""

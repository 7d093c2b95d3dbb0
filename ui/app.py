"""The page's layout: components only. What they show is computed in `fns.py`; `wiring.py` connects them."""

from dataclasses import dataclass

import gradio as gr

from llmd.app.pool import Pool

from .admin import Admin
from .wiring import Session, wire

FAST_S = 1.0  # the status line and the GPU plots
SLOW_S = 2.0  # the other tabs: their data changes once per request or join


@dataclass(frozen=True)
class UiOptions:
    max_new_tokens: int = 256  # the chat's default reply length


def create_ui(pool: Pool, admin: Admin, options: UiOptions = UiOptions()) -> gr.Blocks:
    c: dict[str, gr.components.Component] = {}
    with gr.Blocks(title="llmd", analytics_enabled=False) as demo:
        c["session"] = gr.State(Session())
        c["fast"], c["slow"] = gr.Timer(FAST_S), gr.Timer(SLOW_S)
        with gr.Row():
            c["status"] = gr.Markdown("**loading**", elem_id="status")
            c["live"] = gr.Checkbox(True, label="live updates", scale=0, min_width=140, elem_id="live")
        c["progress"] = gr.HTML(elem_id="progress", js_on_load=None)
        with gr.Tabs():
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_tab(c, options)
            with gr.Tab("Cluster", id="cluster", elem_id="tab-cluster"):
                cluster_tab(c, pool)
            with gr.Tab("GPUs", id="gpus", elem_id="tab-gpus"):
                gpus_tab(c)
            with gr.Tab("Plan", id="plan", elem_id="tab-plan"):
                plan_tab(c)
            with gr.Tab("Balancer", id="balancer", elem_id="tab-balancer"):
                balancer_tab(c)
            with gr.Tab("Costs", id="costs", elem_id="tab-costs"):
                costs_tab(c)
        wire(demo, c, pool, admin)
    return demo


def chat_tab(c: dict, options: UiOptions) -> None:
    c["chatbot"] = gr.Chatbot(elem_id="chatbot", height=420, label="Chat with the pooled model")
    c["reply_stats"] = gr.Markdown(elem_id="reply-stats")
    with gr.Row():
        c["message"] = gr.Textbox(placeholder="Type a message and press Enter", show_label=False, scale=6,
                                  elem_id="chat-input")
        c["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        c["stop"] = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
        c["new_chat"] = gr.Button("New chat", scale=1, elem_id="new-chat")
    with gr.Accordion("Generation settings", open=False, elem_id="gen-settings"), gr.Row():
        c["max_new_tokens"] = gr.Number(options.max_new_tokens, label="max new tokens", precision=0, minimum=1,
                                        elem_id="max-new-tokens")
        c["temperature"] = gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="temperature")
        c["top_p"] = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="top-p")
        c["top_k"] = gr.Slider(0, 200, value=50, step=1, label="top-k (0: off)")
        c["greedy"] = gr.Checkbox(False, label="greedy (always the most likely token)", elem_id="greedy")
    with gr.Accordion("Model", open=False, elem_id="model-picker"):
        gr.Markdown("The models in the models folder, with the precisions the planner says fit the next launch's "
                    "devices (this machine and the joined agents). Running one relaunches the pool on it (admin "
                    "link only).")
        c["models"] = gr.Dataframe(elem_id="models", interactive=False, label="models")
        with gr.Row():
            c["model_pick"] = gr.Dropdown([], label="model", elem_id="model-pick", scale=3)
            c["switch_model"] = gr.Button("Run this model", elem_id="switch-model", scale=1)
        with gr.Row():
            c["models_dir"] = gr.Textbox(label="models folder on the host", elem_id="models-dir", scale=3)
            c["set_models_dir"] = gr.Button("Look there", elem_id="set-models-dir", scale=1)
        c["models_note"] = gr.Markdown(elem_id="models-note")


def cluster_tab(c: dict, pool: Pool) -> None:
    gr.Markdown("Agents announced on the LAN over mDNS. Joining marks an agent for the next launch; "
                "the running engine keeps its devices until you relaunch.")
    c["peers"] = gr.Dataframe(elem_id="peers", interactive=False, label="agents")
    with gr.Row():
        c["peer_pick"] = gr.Dropdown([], label="agent", allow_custom_value=True, elem_id="peer-pick", scale=3)
        c["join"] = gr.Button("Join", variant="primary", elem_id="join", scale=1)
        c["drop"] = gr.Button("Drop", elem_id="drop", scale=1)
        label = "Relaunch (applies joins and drops)" if pool.launches_locally else "Launch on joined agents"
        c["relaunch"] = gr.Button(label, elem_id="relaunch", scale=1)
    c["cluster_note"] = gr.Markdown(elem_id="cluster-note")
    gr.Markdown("**Add a workstation**: run this on it (the pool secret signs every control request; keep it "
                "like a password).")
    c["join_command"] = gr.Code(language="shell", interactive=False, elem_id="join-command", label="join command")
    c["reveal"] = gr.Button("Reveal secret", elem_id="reveal", size="sm")


def gpus_tab(c: dict) -> None:
    c["devices"] = gr.Dataframe(elem_id="devices", interactive=False, label="devices (latest sample)")
    c["window"] = gr.Radio([("5 min", 300), ("1 hour", 3600), ("1 day", 86400)], value=300, label="history",
                           elem_id="window")
    with gr.Row():
        c["util_plot"] = gr.LinePlot(x="time", y="utilisation", color="device", title="utilisation %",
                                     elem_id="util-plot", height=240)
        c["mem_plot"] = gr.LinePlot(x="time", y="memory_used_mb", color="device", title="memory used, MB",
                                    elem_id="mem-plot", height=240)
    with gr.Row():
        c["power_plot"] = gr.LinePlot(x="time", y="power_w", color="device", title="power, W (CPU: estimate)",
                                      elem_id="power-plot", height=240)
        c["temp_plot"] = gr.LinePlot(x="time", y="temperature_c", color="device", title="temperature, °C",
                                     elem_id="temp-plot", height=240)


def plan_tab(c: dict) -> None:
    c["plan_summary"] = gr.Markdown(elem_id="plan-summary")
    with gr.Row():
        with gr.Column(scale=1):
            c["plan_heatmap"] = gr.HTML(elem_id="plan-heatmap", js_on_load=None)
        with gr.Column(scale=2):
            c["plan_bars"] = gr.BarPlot(x="part", y="share %", color="rank", title="each rank's share of the model",
                                        elem_id="plan-bars", height=300, x_label_angle=-20)
            c["prediction"] = gr.Dataframe(elem_id="prediction", interactive=False,
                                           label="the planner's prediction beside the measured figures")


def balancer_tab(c: dict) -> None:
    c["balancer_note"] = gr.Markdown(elem_id="balancer-note")
    c["migrations"] = gr.Dataframe(elem_id="migrations", interactive=False, label="migration timeline")
    c["rank_steps"] = gr.LinePlot(x="time", y="step_ms", color="rank", title="step time per rank, ms",
                                  elem_id="rank-steps", height=260)


def costs_tab(c: dict) -> None:
    c["cost_summary"] = gr.Markdown(elem_id="cost-summary")
    with gr.Row():
        c["cost_plot"] = gr.ScatterPlot(x="time", y="cost_per_million", title="cost per 1M tokens (per minute)",
                                     elem_id="cost-plot", height=240)
        c["tps_plot"] = gr.ScatterPlot(x="time", y="tokens_per_s", title="tokens/s (per minute)", elem_id="tps-plot",
                                    height=240)
    c["requests"] = gr.Dataframe(elem_id="requests", interactive=False, label="recent requests")
    c["cost_by_key"] = gr.Dataframe(elem_id="cost-by-key", interactive=False,
                                    label="the last day's requests and cost per API key")
    with gr.Accordion("Prices", open=True, elem_id="prices"):
        with gr.Row():
            c["price"] = gr.Number(label="electricity per kWh", minimum=0, elem_id="price")
            c["currency"] = gr.Textbox(label="currency", max_lines=1, elem_id="currency")
            c["node_prices"] = gr.Textbox(label="hourly price per node (NODE=PRICE, ...)", max_lines=1,
                                          elem_id="node-prices")
            c["tdp"] = gr.Number(label="CPU TDP, W (for the CPU power estimate)", minimum=1, elem_id="tdp")
        c["save_prices"] = gr.Button("Save prices", variant="primary", elem_id="save-prices")
        c["prices_note"] = gr.Markdown(elem_id="prices-note")
    with gr.Accordion("API keys", open=False, elem_id="api-keys"):
        gr.Markdown("Keys for the OpenAI-compatible API at `/v1` (and the page's login with `--listen`). "
                    "A key is shown once, when it is made; only its hash is kept.")
        c["keys"] = gr.Dataframe(elem_id="keys", interactive=False, label="keys")
        with gr.Row():
            c["key_name"] = gr.Textbox(label="name", max_lines=1, elem_id="key-name", scale=3)
            c["key_create"] = gr.Button("Create key", variant="primary", elem_id="key-create", scale=1)
            c["key_revoke"] = gr.Button("Revoke key", elem_id="key-revoke", scale=1)
        c["key_note"] = gr.Markdown(elem_id="key-note")

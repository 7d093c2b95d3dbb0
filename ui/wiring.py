"""Events: which handler runs on which click or timer tick, reading and writing which components.

Live views follow one pattern: a timer tick compares the pool's cheap version counters with what
this browser session last drew, and redraws (queries the store, builds frames) only on change.
"""

import time
from dataclasses import dataclass, field

import gradio as gr

from llmd.app.pool import ChatSettings, Failed, Finished, Pool, Token, Trimmed
from llmd.engine.errors import LlmdError

from . import fns
from .admin import REFUSED, Admin


@dataclass
class Session:
    """One browser tab's state (Gradio copies it per session)."""

    stop: bool = False  # the Stop button asks the chat under way to end at the next token
    chat: int = 0  # which conversation this tab shows: New chat moves on, and the old reply stops
    emptied: int = -1  # the conversation New chat last emptied the box for
    reveal: bool = False  # the pool secret is shown in the join command
    drawn: dict[str, object] = field(default_factory=dict)  # view -> the version it last drew

    def changed(self, view: str, version: object) -> bool:
        if self.drawn.get(view) == version:
            return False
        self.drawn[view] = version
        return True


def skip(n: int) -> tuple:
    return tuple(gr.skip() for _ in range(n))


def ended(session: Session) -> tuple:
    """The last outputs of a reply that New chat or a newer message ended. Its last chunk can reach the page
    after New chat's empty box (two events, and no order between them), so while the box should still be
    empty it is emptied again; once a newer message is under way, the box is that reply's."""
    if session.emptied == session.chat:
        return [], gr.skip(), ""
    return skip(3)


@dataclass
class Handlers:
    pool: Pool
    admin: Admin

    # ---- status

    def status(self, session: Session, live: bool):
        p = self.pool.progress
        md = fns.status_markdown(p, time.time(), self.pool.waiting(), self.pool.problem, self.pool.describe())
        bar = fns.progress_html(p) if session.changed("progress", (p.phase, p.fraction)) else gr.skip()
        return session, md, bar

    # ---- chat

    def respond(self, message: str, history: list, session: Session, max_new_tokens, temperature, top_p, top_k,
                greedy):
        message = (message or "").strip()
        if not message:
            yield history, gr.skip(), gr.skip()
            return
        session.stop = False
        session.chat += 1
        mine = session.chat  # New chat starts another: this reply then stops and writes nothing more
        history = [{"role": m["role"], "content": fns.message_text(m["content"])} for m in history or []]
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, "", "waiting for the engine…"
        settings = ChatSettings(max_new_tokens=int(max_new_tokens or 1), temperature=temperature, top_p=top_p,
                                top_k=int(top_k), greedy=bool(greedy))
        text, stats, note = "", "", ""
        stopped = lambda: session.stop or session.chat != mine  # noqa: E731
        try:
            for event in self.pool.chat(fns.chat_messages(history[:-1]), settings, stopped):
                if session.chat != mine:  # New chat or a newer message (a bare return puts the old box back)
                    yield ended(session)
                    return
                if isinstance(event, Trimmed):
                    note = fns.trimmed_note(event)
                elif isinstance(event, Token):
                    text += event.text
                    history[-1] = {"role": "assistant", "content": text}
                    yield history, gr.skip(), note or "generating…"
                elif isinstance(event, Finished):
                    history[-1] = {"role": "assistant", "content": fns.with_stats(text, event.reply)}
                    stats = " · ".join(x for x in (fns.reply_stats(event.reply), note) if x)
                elif isinstance(event, Failed):
                    history[-1] = {"role": "assistant", "content": f"*{event.error}*"}
                    stats = f"error: {event.error}"
        except LlmdError as e:  # refused before it ran: not ready, busy, a message too long
            history[-1] = {"role": "assistant", "content": f"*{e}*"}
            stats = f"error: {e}"
        yield (history, gr.skip(), stats) if session.chat == mine else ended(session)

    def stop(self, session: Session):
        session.stop = True
        return session

    def new_chat(self, session: Session):
        """Stop the reply under way at once and start afresh."""
        session.chat += 1
        session.emptied = session.chat
        return session, [], ""

    # ---- cluster

    def cluster(self, session: Session, live: bool):
        peers = self.pool.peers()
        version = tuple((p["name"], p["address"], p["port"], p["health"], p["joined"], p["free_mb"],
                         fns.fetch_text(p.get("fetch"))) for p in peers)
        if not live or not session.changed("cluster", version):
            return (session, *skip(2))
        return session, fns.peers_frame(peers), gr.update(choices=fns.peer_names(peers))

    # ---- the models folder

    def models(self, session: Session, live: bool):
        listed, folder = self.pool.models(), self.pool.models_dir()
        version = (folder, tuple((m.name, m.bytes, tuple(fits)) for m, fits in listed))
        if not live or not session.changed("models", version):
            return (session, *skip(3))
        return (session, fns.models_frame(listed), gr.update(choices=fns.model_choices(listed)),
                gr.update(value=folder or ""))

    def switch_model(self, name: str, request: gr.Request):
        if not self.admin.allows(request):
            return REFUSED
        if not name:
            return "Pick a model first."
        try:
            self.pool.switch_model(name)
        except LlmdError as e:
            return f"Cannot switch now: {e}"
        return "Launching it: the status line above shows the progress."

    def set_models_dir(self, folder: str, session: Session, request: gr.Request):
        if not self.admin.allows(request):
            return session, REFUSED
        try:
            path = self.pool.set_models_dir(folder.strip())
        except LlmdError as e:
            return session, f"Not changed: {e}"
        session.drawn.pop("models", None)
        return session, f"Listing the models in {path}."

    def join(self, name: str, session: Session, request: gr.Request):
        return self._peer_action(self.pool.join, name, ("join", "joined"), session, request)

    def drop(self, name: str, session: Session, request: gr.Request):
        return self._peer_action(self.pool.drop, name, ("drop", "dropped"), session, request)

    def _peer_action(self, action, name: str, verbs: tuple[str, str], session: Session, request):
        if not self.admin.allows(request):
            return session, gr.skip(), REFUSED
        if not name:
            return session, gr.skip(), "Pick an agent first."
        try:
            action(name)
        except LlmdError as e:
            return session, gr.skip(), f"Could not {verbs[0]} {name}: {e}"
        session.drawn.pop("cluster", None)
        note = f"{name} {verbs[1]}. The running engine keeps its devices; relaunch to use the change."
        return session, fns.peers_frame(self.pool.peers()), note

    def relaunch(self, request: gr.Request):
        if not self.admin.allows(request):
            return REFUSED
        try:
            self.pool.relaunch()
        except LlmdError as e:
            return f"Cannot launch now: {e}"
        return "Launching: the status line above shows the progress."

    def join_command(self, session: Session):
        label = "Hide secret" if session.reveal else "Reveal secret"
        return session, fns.join_command(self.pool.join_secret(), session.reveal), gr.update(value=label)

    def reveal(self, session: Session, request: gr.Request):
        if not self.admin.allows(request):
            session.reveal = False
            return *self.join_command(session), REFUSED
        session.reveal = not session.reveal
        return *self.join_command(session), gr.skip()

    # ---- GPUs

    def gpus(self, session: Session, live: bool, window: int):
        if not live or not session.changed("gpus", (self.pool.versions.samples, window)):
            return (session, *skip(5))
        rows = self.pool.recent_samples(float(window or 300))
        names = {(g["node"], g["device"]): g["name"] for g in self.pool.gpus()}
        frame = fns.samples_frame(rows)
        plots = [fns.metric_frame(frame, m) for m in ("utilisation", "memory_used_mb", "power_w", "temperature_c")]
        return (session, fns.devices_frame(rows, names), *plots)

    # ---- plan

    def plan(self, session: Session, live: bool):
        if not live or not session.changed("plan", (self.pool.versions.plan, self.pool.versions.requests)):
            return (session, *skip(4))
        entry = self.pool.latest_plan()
        if entry is None:
            return session, fns.plan_summary(None), "", gr.skip(), gr.skip()
        requests = self.pool.requests(since=entry["time"])
        return (session, fns.plan_summary(entry), fns.plan_heatmap_html(entry["plan"]),
                fns.shares_frame(entry["plan"]), fns.prediction_frame(entry, requests))

    # ---- balancer

    def balancer(self, session: Session, live: bool):
        if not live or not session.changed("balancer", self.pool.versions.requests):
            return (session, *skip(3))
        events, steps = self.pool.migrations(), self.pool.rank_steps(since=time.time() - 86400)
        return session, fns.balancer_note(events, steps), fns.migrations_frame(events), fns.rank_steps_frame(steps)

    # ---- costs

    def costs(self, session: Session, live: bool):
        version = (self.pool.versions.requests, self.pool.versions.settings)
        if not live or not session.changed("costs", version):
            return (session, *skip(6))
        requests, settings = self.pool.requests(since=time.time() - 86400), self.pool.settings()
        frame = fns.cost_frame(requests, settings)
        return (session, fns.cost_markdown(requests, settings), frame[["time", "cost_per_million"]].dropna(),
                frame[["time", "tokens_per_s"]], fns.requests_frame(requests, settings),
                fns.cost_by_key(requests, settings), fns.keys_frame(self.pool.keys()))

    def create_key(self, name: str, request: gr.Request):
        if not self.admin.allows(request):
            return gr.skip(), REFUSED
        try:
            key = self.pool.create_key((name or "").strip())
        except LlmdError as e:
            return gr.skip(), f"No key made: {e}"
        return (fns.keys_frame(self.pool.keys()),
                f"Key for **{name.strip()}**, shown this once (copy it now):\n\n`{key}`")

    def revoke_key(self, name: str, request: gr.Request):
        if not self.admin.allows(request):
            return gr.skip(), REFUSED
        try:
            self.pool.revoke_key((name or "").strip())
        except LlmdError as e:
            return gr.skip(), f"Not revoked: {e}"
        return fns.keys_frame(self.pool.keys()), f"Revoked {name.strip()}: requests with it are refused from now on."

    def price_form(self):
        s = self.pool.settings()
        return s.electricity_per_kwh, s.currency, fns.format_node_prices(s.node_hourly), s.cpu_tdp_w

    def save_prices(self, price, currency, node_prices, tdp, request: gr.Request):
        if not self.admin.allows(request):
            return f"Not saved. {REFUSED}"
        try:
            settings = fns.settings_from_form(price, currency, node_prices, tdp, self.pool.settings())
        except ValueError as e:
            return f"Not saved: {e}"
        self.pool.save_settings(settings)
        return f"Saved: {settings.electricity_per_kwh:g} {settings.currency}/kWh, CPU TDP {settings.cpu_tdp_w:g} W."


def wire(demo: gr.Blocks, c: dict, pool: Pool, admin: Admin) -> None:
    """Every event is private: the page calls it, no API client is offered it (the admin check inside the
    handlers is what refuses a crafted call)."""
    h = Handlers(pool, admin)
    s, live = c["session"], c["live"]
    private = {"api_visibility": "private"}
    quiet = {"show_progress": "hidden", **private}
    views = [
        (h.status, [s, live], [s, c["status"], c["progress"]], c["fast"]),
        (h.gpus, [s, live, c["window"]], [s, c["devices"], c["util_plot"], c["mem_plot"], c["power_plot"],
                                          c["temp_plot"]], c["fast"]),
        (h.cluster, [s, live], [s, c["peers"], c["peer_pick"]], c["slow"]),
        (h.models, [s, live], [s, c["models"], c["model_pick"], c["models_dir"]], c["slow"]),
        (h.plan, [s, live], [s, c["plan_summary"], c["plan_heatmap"], c["plan_bars"], c["prediction"]], c["slow"]),
        (h.balancer, [s, live], [s, c["balancer_note"], c["migrations"], c["rank_steps"]], c["slow"]),
        (h.costs, [s, live], [s, c["cost_summary"], c["cost_plot"], c["tps_plot"], c["requests"], c["cost_by_key"],
                              c["keys"]], c["slow"]),
    ]
    for fn, inputs, outputs, timer in views:
        timer.tick(fn, inputs, outputs, **quiet)
        demo.load(fn, inputs, outputs, **quiet)
    c["window"].change(h.gpus, [s, live, c["window"]], [s, c["devices"], c["util_plot"], c["mem_plot"],
                                                        c["power_plot"], c["temp_plot"]], **quiet)
    demo.load(h.join_command, [s], [s, c["join_command"], c["reveal"]], **quiet)
    demo.load(h.price_form, None, [c["price"], c["currency"], c["node_prices"], c["tdp"]], **quiet)

    chat_in = [c["message"], c["chatbot"], s, c["max_new_tokens"], c["temperature"], c["top_p"], c["top_k"],
               c["greedy"]]
    chat_out = [c["chatbot"], c["message"], c["reply_stats"]]
    # "multiple": Gradio's default ("once") drops a click while the same event is pending, and a reply
    # that New chat ended is pending until its generator has seen it: a message sent at once was lost.
    # A second reply ends the first itself (Session.chat), so letting every click through is safe.
    every_click = {"concurrency_limit": None, "trigger_mode": "multiple"}
    for trigger in (c["send"].click, c["message"].submit):
        trigger(h.respond, chat_in, chat_out, show_progress="minimal", **every_click, **private)
    c["stop"].click(h.stop, [s], [s], **every_click, **quiet)
    c["new_chat"].click(h.new_chat, [s], [s, c["chatbot"], c["reply_stats"]], **every_click, **quiet)

    c["join"].click(h.join, [c["peer_pick"], s], [s, c["peers"], c["cluster_note"]], **private)
    c["drop"].click(h.drop, [c["peer_pick"], s], [s, c["peers"], c["cluster_note"]], **private)
    c["relaunch"].click(h.relaunch, None, [c["cluster_note"]], **private)
    c["switch_model"].click(h.switch_model, [c["model_pick"]], [c["models_note"]], **private)
    c["set_models_dir"].click(h.set_models_dir, [c["models_dir"], s], [s, c["models_note"]], **private)
    c["reveal"].click(h.reveal, [s], [s, c["join_command"], c["reveal"], c["cluster_note"]], **quiet)
    c["key_create"].click(h.create_key, [c["key_name"]], [c["keys"], c["key_note"]], **private)
    c["key_revoke"].click(h.revoke_key, [c["key_name"]], [c["keys"], c["key_note"]], **private)
    c["save_prices"].click(h.save_prices, [c["price"], c["currency"], c["node_prices"], c["tdp"]], [c["prices_note"]],
                           **private)

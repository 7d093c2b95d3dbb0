"""The running pool as one small typed facade: the only thing the web UI (`ui/`) talks to.

Behind it: the supervisor (app/supervisor.py: the agent child, discovery, launching and relaunching
the engine), the serving loop (app/serving.py: every chat and API request, many in each step, each
journalled in the store) and telemetry (app/telemetry.py: one sample per device every second).
No Gradio here: `ui/` calls these methods and draws what they return.
"""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from llmd.engine.checkpoint import model_name
from llmd.engine.sampling import SamplingParams

from .host import Fetch
from .keys import create_key, key_name
from .models import Found
from .serving import Event, Failed, Finished, PoolNotReady, Reply, Request, Ticket, Token
from .store import Settings, Store
from .supervisor import Engine, PoolConfig, Progress, Recipe, Supervisor
from .telemetry import Sources, Telemetry
from .text import TextModel

# The facade passes on what its callers need, so ui/ imports from here alone.
__all__ = ["ChatSettings", "Event", "Failed", "Fetch", "Finished", "Found", "Pool", "PoolConfig", "PoolNotReady",
           "Progress", "Recipe", "Reply", "Request", "Ticket", "Token", "Trimmed"]


@dataclass
class ChatSettings:
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    greedy: bool = False

    def sampling(self, stop_token_ids: list[int]) -> SamplingParams:
        return SamplingParams(max_new_tokens=int(self.max_new_tokens), greedy=self.greedy,
                              temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
                              stop_token_ids=stop_token_ids)


@dataclass(frozen=True)
class Versions:
    """What each live view depends on, cheap to compare: a view redraws only when its part changed."""

    plan: object
    requests: object
    samples: object
    settings: object


@dataclass(frozen=True)
class Trimmed:
    """A chat's oldest turns were left out so that it fits the context: the first event of that reply."""

    turns: int  # messages left out
    prompt_tokens: int  # what the reply was asked with


class Pool:
    """Use as a context manager, or call `close()`: it stops the agent child, the engine and the threads."""

    def __init__(self, store: Store, config: PoolConfig):
        self.store, self.config = store, config
        sources = Sources(engine=lambda: self.supervisor.engine, host=lambda: self.supervisor.host,
                          is_local=lambda advert: self.supervisor._is_local(advert),
                          each_tick=lambda tick: self.supervisor.each_tick(tick))
        self.telemetry = Telemetry(store, config.node, config.sample_period_s, sources)
        self.supervisor = Supervisor(store, config, sample_now=self.telemetry.sample_now, gpu_names=self._gpu_names)
        self._settings = 0  # bumped when prices or keys change

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self, local_agent_devices: str | None = None, local_agent: bool = True) -> None:
        self.supervisor.start(local_agent_devices, local_agent)
        self.telemetry.start()

    def close(self) -> None:
        self.telemetry.close()
        self.supervisor.close()

    # ---- the engine and its launch

    @property
    def engine(self) -> Engine | None:
        return self.supervisor.engine

    @property
    def progress(self) -> Progress:
        return self.supervisor.progress

    @property
    def problem(self) -> str:
        """What went wrong outside any request, for the status line ("" when all is well)."""
        serving = self.supervisor.serving
        parts = [self.telemetry.problem, self.supervisor.problem, serving.journal_problem if serving else ""]
        return "; ".join(p for p in parts if p)

    @property
    def launches_locally(self) -> bool:
        """`llmd up` (ranks on this machine unless other machines are joined) rather than `llmd host`."""
        return self.config.recipe.local

    def launch_local(self) -> None:
        self.supervisor.launch_local()

    def launch_on_joined(self) -> None:
        self.supervisor.launch_on_joined()

    def relaunch(self) -> None:
        self.supervisor.relaunch()

    # ---- the models folder

    def models(self) -> list[tuple[Found, list[str]]]:
        """The models folder's models, each with the precisions that fit the running engine's devices."""
        return self.supervisor.models()

    def models_dir(self) -> str | None:
        return self.config.recipe.models_dir

    def set_models_dir(self, folder: str) -> str:
        return self.supervisor.set_models_dir(folder)

    def switch_model(self, name: str) -> None:
        """Relaunch the pool on one of the models folder's models, by its name there."""
        self.supervisor.switch_model(name)

    def expect_agents(self, count: int, timeout_s: float) -> None:
        self.supervisor.expect_agents(count, timeout_s)

    def describe(self) -> str:
        return self.supervisor.describe()

    # ---- chat and completions

    def _serving(self):
        engine, serving = self.supervisor.engine, self.supervisor.serving
        if engine is None or serving is None or not self.progress.ready:
            p = self.progress
            why = f"failed: {p.error}" if p.phase == "failed" else f"{p.phase} ({p.fraction:.0%})"
            raise PoolNotReady(f"the model is not ready yet: {why}")
        return engine, serving

    def model_name(self) -> str | None:
        """The running model's name (what the API lists), None while none runs."""
        engine = self.engine
        return None if engine is None else model_name(Path(engine.spec.model_dir))

    def text_model(self) -> TextModel:
        return self._serving()[0].text

    @property
    def context(self) -> int:
        return self._serving()[0].spec.context

    def waiting(self) -> int:
        serving = self.supervisor.serving
        return serving.waiting() if serving else 0

    def running(self) -> int:
        serving = self.supervisor.serving
        return serving.running() if serving else 0

    def submit(self, request: Request) -> Ticket:
        """Queue a request (the API's way in); raises PoolNotReady, PromptTooLong or QueueFull."""
        return self._serving()[1].submit(request)

    def chat(self, messages: list[dict], settings: ChatSettings,
             should_stop: Callable[[], bool] = lambda: False) -> Iterator[Trimmed | Event]:
        """A chat reply's events (`Token`s, then `Finished` or `Failed`), after a `Trimmed` when the oldest
        turns had to be left out to fit the context. Journalled before it runs."""
        engine, serving = self._serving()
        ids, dropped = fit_history(engine.text, messages, engine.spec.context, settings.max_new_tokens)
        if dropped:
            yield Trimmed(dropped, len(ids))
        request = Request(ids, settings.sampling(engine.text.stop_token_ids), user=self.config.user,
                          prompt_text=last_user_text(messages))
        yield from serving.submit(request).events(lambda: should_stop() or self.progress.phase == "stopped")

    # ---- API keys

    def create_key(self, name: str) -> str:
        """A new API key for `name`, returned once (the store keeps its hash)."""
        key = create_key(self.store, name)
        self._settings += 1
        return key

    def revoke_key(self, name: str) -> None:
        self.store.revoke_key(name)
        self._settings += 1

    def keys(self) -> list[dict]:
        return self.store.keys()

    def login(self, user: str, password: str) -> bool:
        """The web page's login beyond loopback: a live API key, under its own name."""
        return key_name(self.store, password or "") == user

    # ---- peers

    def peers(self) -> list[dict]:
        return self.supervisor.peers()

    def join(self, name: str) -> dict:
        return self.supervisor.join(name)

    def drop(self, name: str) -> dict:
        return self.supervisor.drop(name)

    def join_secret(self) -> str:
        """The pool secret, for the join command (the UI shows it to the admin session only)."""
        return self.config.secret

    # ---- what the live views read

    @property
    def versions(self) -> Versions:
        serving = self.supervisor.serving
        requests = (id(serving), serving.version if serving else 0)  # a relaunch's loop counts afresh
        return Versions(self.supervisor.plan_version, requests, self.telemetry.version, self._settings)

    def sample_now(self) -> None:
        self.telemetry.sample_now()

    def local_samples(self, now: float):
        return self.telemetry.local_samples(now)

    def recent_samples(self, window_s: float = 300.0) -> list[dict]:
        return self.store.samples(since=time.time() - window_s)

    def _gpu_names(self) -> dict[str, str]:
        return {f"cuda:{i}": n for i, (n, _) in self.telemetry.gpu_names.items()}

    def gpus(self) -> list[dict]:
        return self.store.gpus()

    def latest_plan(self) -> dict | None:
        return self.store.latest_plan()

    def requests(self, since: float | None = None) -> list[dict]:
        return self.store.requests(since=since)

    def migrations(self) -> list[dict]:
        return self.store.migrations()

    def rank_steps(self, since: float | None = None) -> list[dict]:
        return self.store.rank_steps(since=since)

    def settings(self) -> Settings:
        return self.store.settings()

    def save_settings(self, settings: Settings) -> None:
        self.store.save_settings(settings)
        self._settings += 1


def last_user_text(messages: list[dict]) -> str:
    users = [m["content"] for m in messages if m.get("role") == "user" and isinstance(m.get("content"), str)]
    return users[-1] if users else ""


def fit_history(text: TextModel, messages: list[dict], context: int, max_new_tokens: int) -> tuple[list[int], int]:
    """The chat's prompt ids, leaving out its oldest turns (the system message kept) until the prompt
    leaves room for the reply: `max_new_tokens`, but at most half the context. Returns (ids, messages
    left out). The last message always stays; one alone too long is refused when it is submitted."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    rest = messages[len(system):]
    reserve = min(max(int(max_new_tokens), 1), context // 2)
    dropped = 0
    while True:
        ids = text.chat_ids(system + rest)
        if len(ids) + reserve <= context or len(rest) <= 1:
            return ids, dropped
        cut = 1
        while cut < len(rest) - 1 and rest[cut].get("role") != "user":  # a turn starts with the user
            cut += 1
        rest, dropped = rest[cut:], dropped + cut

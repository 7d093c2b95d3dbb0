"""`llmd eval`: perplexity of a text, teacher-forced through the engine itself.

The sliding-window method of Hugging Face's "Perplexity of fixed-length models": windows of
`context` tokens advance by `stride`; each window scores only the tokens no earlier window
scored (the ones before serve as context), so with stride < context every token but the first is
scored exactly once.
Perplexity is exp of the mean negative log-likelihood, in nats.

`perplexity` is pure: it takes any `score_window(ids) -> logits [S, V]`, the engine's driver or
transformers alike, so the arithmetic is tested without processes.
"""

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm import tqdm

from llmd.engine.errors import LlmdError

DEFAULT_TEXT = Path(__file__).with_name("eval_text.txt")  # essays written for this repository, ~4800 tokens
ROWS_PER_CHUNK = 256  # logits rows scored at once: bounds the float32 temporaries to rows x vocab


class TextTooShort(LlmdError): ...


class BadWindow(LlmdError): ...


@dataclass(frozen=True)
class Span:
    """One window: ids[begin:end] go in; the tokens at positions [first, end) are scored."""
    begin: int
    end: int
    first: int


@dataclass(frozen=True)
class Result:
    nll: float  # summed negative log-likelihood, natural log
    tokens: int  # tokens scored
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)


def spans(n: int, context: int, stride: int) -> list[Span]:
    """The windows over n tokens. Each scores the positions no earlier window scored, except a window's own
    first token, which has no context in it: with stride < context every position 1..n-1 is scored once."""
    if n < 2:
        raise TextTooShort(f"the text has {n} token(s); scoring needs at least 2")
    if context < 2 or not 1 <= stride <= context:
        raise BadWindow(f"the stride must be between 1 and the context ({context}), got {stride}")
    out, scored_to = [], 1  # the first token has nothing before it: never scored
    for begin in range(0, n, stride):
        end = min(begin + context, n)
        out.append(Span(begin, end, max(scored_to, begin + 1)))
        scored_to = end
        if end == n:
            break
    return out


def window_nll(logits: torch.Tensor, ids: list[int], span: Span) -> float:
    """Summed NLL of the span's scored tokens, from the window's logits [S, V] (row i predicts token i+1)."""
    assert logits.shape[0] == span.end - span.begin, (logits.shape, span)
    targets = torch.tensor(ids[span.first : span.end])  # [T]
    rows = logits[span.first - span.begin - 1 : span.end - span.begin - 1]  # [T, V]
    total = 0.0
    for at in range(0, len(targets), ROWS_PER_CHUNK):
        chunk = rows[at : at + ROWS_PER_CHUNK].float()  # [t, V]
        picked = chunk.gather(1, targets[at : at + ROWS_PER_CHUNK, None].to(chunk.device))[:, 0]  # [t]
        total += (torch.logsumexp(chunk, dim=-1) - picked).double().sum().item()
    return total


def perplexity(score_window: Callable[[list[int]], torch.Tensor], ids: list[int], context: int, stride: int,
               progress: Callable[[Iterable[Span]], Iterable[Span]] = lambda s: s) -> Result:
    """Teacher-forced perplexity of `ids`; `score_window(window_ids)` returns logits [S, V]."""
    windows = spans(len(ids), context, stride)
    nll, scored = 0.0, 0
    for span in progress(windows):
        nll += window_nll(score_window(ids[span.begin : span.end]), ids, span)
        scored += span.end - span.first
    return Result(nll, scored, len(windows))


def add_eval_parser(sub, add_engine_options) -> None:
    p = sub.add_parser("eval", help="measure a model's perplexity on a text, through the engine",
                       description="Perplexity of a text, teacher-forced through the engine with a sliding window "
                                   "of --context tokens. Example: llmd eval --workers 2 --weights int8 --json")
    add_engine_options(p)
    p.set_defaults(compile="off")  # only whole windows run: the compiled decode step would never be used
    p.add_argument("--text", metavar="FILE", help="UTF-8 text to score (default: the essays shipped with llmd)")
    p.add_argument("--stride", type=int, help="tokens each window advances (default: half the context)")
    p.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)


def read_text(path: str | None) -> str:
    try:
        return Path(path).read_text(encoding="utf-8") if path else DEFAULT_TEXT.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise LlmdError(f"cannot read the text {path}: {getattr(e, 'strerror', None) or e}") from None


def cmd_eval(args) -> int:
    from . import cli  # here, not at the top: cli.py imports this module while it loads

    setup = cli.prepare(args)
    ids = setup.text.tokenizer(read_text(args.text), add_special_tokens=False)["input_ids"]
    if args.max_tokens is not None:
        ids = ids[: max(args.max_tokens, 0)]
    context = setup.spec.context
    stride = args.stride if args.stride is not None else max(1, context // 2)
    spans(len(ids), context, stride)  # a bad window or text fails before any process starts
    weights = setup.spec.weights  # what --weights (auto included) resolved to
    with cli.LocalCluster(setup.spec, setup.world_size, setup.balancer) as cluster:
        driver = cluster.driver
        t0 = time.perf_counter()
        result = perplexity(lambda w: driver.forward([w], [0], [0], all_logits=True)[0], ids, context, stride,
                            progress=lambda s: tqdm(s, desc="llmd: eval", unit="window", file=sys.stderr))
        seconds = time.perf_counter() - t0
        driver.clear_slot(0)
    out = {"perplexity": result.perplexity, "nll": result.nll, "tokens": result.tokens, "windows": result.windows,
           "weights": weights, "model": args.model, "workers": setup.world_size, "device": setup.spec.device,
           "context": context, "stride": stride, "text": args.text or "default", "seconds": round(seconds, 3),
           "tokens_per_s": round(result.tokens / seconds, 1)}
    if args.json:
        print(json.dumps(out), flush=True)
    else:
        print(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens ({args.model}, {weights}, "
              f"{setup.world_size} worker(s), context {context}, stride {stride}, {result.windows} windows, "
              f"{seconds:.1f} s)", flush=True)
    return 0

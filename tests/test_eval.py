"""`llmd eval`: the sliding-window perplexity equals transformers' own `labels=` loss over the same
windows, computed both purely (a transformers scorer) and through the engine's worker processes."""

import argparse
import contextlib
import io
import sys

import pytest
import torch
from transformers import AutoTokenizer

from conftest import Run
from llmd.app import cli
from llmd.app.evaluate import DEFAULT_TEXT, BadWindow, TextTooShort, add_eval_parser, perplexity, spans
from llmd.engine.errors import LlmdError
from reference import hf_model


def text_ids(model_dir, n: int) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(DEFAULT_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:n]


@torch.inference_mode()
def hf_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The Hugging Face guide's loop: labels -100 on the tokens an earlier window scored. Its loss is a mean
    over the labels left after the shift by one, so that count (not the guide's `valid - 1`) weights it."""
    x = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        window = x[:, begin:end]
        labels = window.clone()
        labels[:, : -(end - prev_end)] = -100
        scored = int((labels[:, 1:] != -100).sum())
        nll += model(window, labels=labels).loss.item() * scored
        count += scored
        prev_end = end
        if end == len(ids):
            break
    return nll, count


@pytest.mark.parametrize("n, context, stride", [(1, 4, 2), (9, 4, 2), (10, 4, 3), (10, 4, 4), (3, 8, 4), (50, 7, 1)])
def test_spans_score_each_token_once(n, context, stride):
    if n < 2:
        with pytest.raises(TextTooShort):
            spans(n, context, stride)
        return
    got = spans(n, context, stride)
    scored = [p for s in got for p in range(s.first, s.end)]
    assert all(s.begin < s.first and s.end - s.begin <= context for s in got)
    if stride < context:
        assert scored == list(range(1, n))
    else:  # no overlap: a window's first token has nothing before it in the window
        assert scored == [p for p in range(1, n) if p % context]


@pytest.mark.parametrize("stride", [0, 5])
def test_a_stride_outside_the_context_is_refused(stride):
    with pytest.raises(BadWindow):
        spans(10, 4, stride)


@pytest.mark.parametrize("context, stride", [(128, 48), (128, 128), (512, 256)])
def test_perplexity_equals_transformers_labels_loss(tiny_models, context, stride):
    model_dir = tiny_models["llama-gqa"]
    model = hf_model(model_dir)
    ids = text_ids(model_dir, 400)

    def score_window(window: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            return model(torch.tensor([window])).logits[0]  # [S, V]

    got = perplexity(score_window, ids, context, stride)
    nll, count = hf_perplexity(model, ids, context, stride)
    assert got.tokens == count
    assert got.perplexity == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-5)


def eval_here(*args: str) -> Run:
    """The eval command's code in this process, as conftest's `llmd_here` runs `llmd`."""
    parser = argparse.ArgumentParser(prog="llmd")
    add_eval_parser(parser.add_subparsers(dest="command", required=True), cli.add_engine_options)
    parsed = parser.parse_args(["eval", *args])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = parsed.func(parsed)
        except LlmdError as e:
            print(f"llmd: error: {e}", file=sys.stderr)
            code = 1
    return Run(code, out.getvalue(), err.getvalue())


def test_eval_through_two_workers_equals_transformers(default_model_dir):
    out = eval_here("--workers", "2", "--weights", "fp32", "--context", "128", "--max-tokens", "300", "--json").json
    assert {"perplexity", "tokens", "weights", "model", "workers", "context", "stride", "seconds"} <= out.keys()
    assert (out["weights"], out["workers"], out["context"], out["stride"]) == ("fp32", 2, 128, 64)
    ids = text_ids(default_model_dir, 300)
    nll, count = hf_perplexity(hf_model(default_model_dir), ids, 128, 64)
    assert out["tokens"] == count == 299
    assert out["perplexity"] == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-3)


def test_a_bad_stride_fails_in_one_line_before_any_worker_starts():
    bad = eval_here("--context", "64", "--stride", "65")
    assert bad.returncode == 1 and "stride" in bad.stderr and "Traceback" not in bad.stderr

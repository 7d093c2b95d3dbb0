"""Tokens <-> text for the CLI: tokenizer, chat template, stop tokens, streaming."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from llmd.engine.errors import LlmdError


@dataclass
class TextModel:
    tokenizer: PreTrainedTokenizerBase
    stop_token_ids: list[int]

    @classmethod
    def load(cls, model_dir: Path) -> "TextModel":
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        stops = set()
        if tokenizer.eos_token_id is not None:
            stops.add(tokenizer.eos_token_id)
        if (model_dir / "generation_config.json").is_file():
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
            stops.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        return cls(tokenizer, sorted(stops))

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise LlmdError("this model has no chat template; drop --chat")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def detokenizer(self) -> "Detokenizer":
        return Detokenizer(self.decode)

    def streamer(self, out: TextIO) -> Callable[[int], None]:
        """A callback that prints text as tokens arrive, never splitting a multi-byte character."""
        detok = self.detokenizer()

        def on_token(token: int) -> None:
            text = detok.add(token)
            if text:
                out.write(text)
                out.flush()

        return on_token


class Detokenizer:
    """Text deltas of a reply token by token, in time linear in its length.

    Decoding the whole reply on every token costs quadratic time. Decoding the new token alone is
    wrong: tokenizers merge spaces and bytes across token boundaries. So, as vLLM and TGI do, decode a
    short window twice, without and with the new tokens, and emit the difference; the window moves on
    once a delta is emitted. A delta ending in U+FFFD is half of a UTF-8 character: wait for the rest.
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # the window starts here: context for the tokenizer's merging
        self.read = 0  # text up to here has been emitted

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

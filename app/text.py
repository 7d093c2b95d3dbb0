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

    def streamer(self, out: TextIO) -> Callable[[int], None]:
        """A callback that prints text as tokens arrive, never splitting a multi-byte character."""
        ids: list[int] = []
        shown = 0

        def on_token(token: int) -> None:
            nonlocal shown
            ids.append(token)
            text = self.decode(ids)
            if text.endswith("\ufffd"):
                return  # half of a UTF-8 sequence: wait for the rest
            out.write(text[shown:])
            out.flush()
            shown = len(text)

        return on_token

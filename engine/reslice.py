"""A rank's next shard from the slices it already holds, reading only what it gains.

When the balancer moves a few heads and columns, most of a rank's new shard is already in
memory: the giver keeps a subset of its rows, the taker adds some. `ReusingReader` stands in
for the checkpoint's `SliceReader` while a new shard is loaded: a tensor the move leaves as
it was is shared with the old shard, every other range the old shard holds is copied from
memory, and only the rest is read from the file. The values are the same either way, so a
move never changes a logit.
"""

import torch

from .checkpoint import SliceReader, runs
from .config import ModelConfig
from .plan import RankShard

Held = dict[str, tuple[torch.Tensor, int | None, list[tuple[int, int]]]]  # name -> (tensor, dim, global ranges)


class ReusingReader:
    def __init__(self, reader: SliceReader, held: Held):
        self.reader, self.held = reader, held
        self.bytes_read = 0  # from the file; the rest came from memory

    def has(self, name: str) -> bool:
        return self.reader.has(name)

    def whole(self, name: str) -> torch.Tensor:
        if name in self.held and self.held[name][1] is None:
            return self.held[name][0]
        return self._count(self.reader.whole(name))

    def rows(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return self._take(name, ranges, 0)

    def cols(self, name: str, ranges: list[tuple[int, int]]) -> torch.Tensor:
        return self._take(name, ranges, 1)

    def _take(self, name: str, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
        tensor, held_dim, have = self.held.get(name, (None, None, []))
        if held_dim != dim:
            have = []
        if have and list(ranges) == list(have) and tensor.is_contiguous():
            return tensor  # unchanged by the move: shared, never copied (weights are never written in place)
        parts = []
        for a, b in ranges:
            for start, end, local in pieces(a, b, have):
                if local is None:
                    read = self.reader.rows if dim == 0 else self.reader.cols
                    parts.append(self._count(read(name, [(start, end)])))
                else:
                    parts.append(tensor.narrow(dim, local, end - start))
        return torch.cat(parts, dim)

    def _count(self, t: torch.Tensor) -> torch.Tensor:
        self.bytes_read += t.numel() * t.element_size()
        return t


def pieces(a: int, b: int, have: list[tuple[int, int]]) -> list[tuple[int, int, int | None]]:
    """[a, b) cut into (start, end, offset in the held tensor), offset None where it is not held.
    `have` lists the held global ranges in the order the held tensor stores them."""
    held, offset = [], 0
    for s, e in have:
        held.append((s, e, offset))
        offset += e - s
    out, pos = [], a
    for s, e, off in sorted(held):
        if e <= pos or s >= b:
            continue
        if s > pos:
            out.append((pos, s, None))
        end = min(e, b)
        out.append((max(s, pos), end, off + max(s, pos) - s))
        pos = end
    if pos < b:
        out.append((pos, b, None))
    return out


def held_by_layer(cfg: ModelConfig, shard: RankShard, layer, i: int) -> Held:
    """Which checkpoint tensors of layer `i` the rank's `layer` weights hold, and which of their ranges."""
    D = cfg.head_dim
    q, kv, cols = runs(shard.q_heads, D), runs(shard.kv_heads, D), [shard.mlp_columns]
    nk, nc = len(shard.kv_heads) * D, shard.num_mlp_columns
    a, m = f"model.layers.{i}.self_attn.", f"model.layers.{i}.mlp."
    held: Held = {
        f"model.layers.{i}.input_layernorm.weight": (layer.attn_norm, None, []),
        f"model.layers.{i}.post_attention_layernorm.weight": (layer.mlp_norm, None, []),
        a + "q_proj.weight": (layer.wq, 0, q),
        a + "k_proj.weight": (layer.wkv[:nk], 0, kv),
        a + "v_proj.weight": (layer.wkv[nk:], 0, kv),
        a + "o_proj.weight": (layer.wo, 1, q),
        m + "gate_proj.weight": (layer.wgu[:nc], 0, cols),
        m + "up_proj.weight": (layer.wgu[nc:], 0, cols),
        m + "down_proj.weight": (layer.wdown, 1, cols),
    }
    if layer.bq is not None:
        held.update({a + "q_proj.bias": (layer.bq, 0, q), a + "k_proj.bias": (layer.bkv[:nk], 0, kv),
                     a + "v_proj.bias": (layer.bkv[nk:], 0, kv)})
    if layer.bgu is not None:
        held.update({m + "gate_proj.bias": (layer.bgu[:nc], 0, cols), m + "up_proj.bias": (layer.bgu[nc:], 0, cols)})
    if layer.bo is not None:
        held[a + "o_proj.bias"] = (layer.bo, None, [])
    if layer.bdown is not None:
        held[m + "down_proj.bias"] = (layer.bdown, None, [])
    return held


def held_by_ends(shard: RankShard, weights) -> Held:
    """The embedding, LM head and final norm rows the rank's `weights` hold."""
    vocab = [shard.vocab_rows]
    held: Held = {}
    if weights.embed is not None:
        held["model.embed_tokens.weight"] = (weights.embed, 0, vocab)
    if weights.lm_head is not None and weights.lm_head is not weights.embed:
        held["lm_head.weight"] = (weights.lm_head, 0, vocab)
    elif weights.lm_head is not None:  # tied: the LM head rows are the embedding's
        held["model.embed_tokens.weight"] = (weights.lm_head, 0, vocab)
    if weights.final_norm is not None:
        held["model.norm.weight"] = (weights.final_norm, None, [])
    return held

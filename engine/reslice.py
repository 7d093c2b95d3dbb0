"""A rank's next shard from the slices it already holds, reading only what it gains.

When the balancer moves a few heads and columns, most of a rank's new shard is already in
memory: the giver keeps a subset of its rows, the taker adds some. `ReusingReader` stands in
for the checkpoint's `SliceReader` while a new shard is loaded: a tensor the move leaves as
it was is shared with the old shard, every other range the old shard holds is copied from
memory, and only the rest is read from the file. The values are the same either way, so a
move never changes a logit.
"""

import torch

from . import sharding
from .checkpoint import SliceReader
from .config import ModelConfig
from .layers import Dense
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

    def quantised(self, *args, **kwargs):
        return self.reader.quantised(*args, **kwargs)  # quantised fields are read again, never reused

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


def held_pieces(cfg: ModelConfig, shard: RankShard, pieces, tensor: torch.Tensor, prefix: str = "") -> Held:
    """What a field's tensor holds of each of its pieces: fused pieces are consecutive row blocks."""
    held: Held = {}
    offset = 0
    for piece in pieces:
        rows = sharding.shape(cfg, piece, shard)[0]
        part = tensor if len(pieces) == 1 else tensor.narrow(0, offset, rows)
        have = [] if piece.dim is None else sharding.ranges(cfg, shard, piece.unit)
        held[prefix + piece.name] = (part, piece.dim, have)
        offset += rows
    return held


def held_by_layer(cfg: ModelConfig, shard: RankShard, layer, i: int) -> Held:
    """Which checkpoint tensors of layer `i` the rank's `layer` weights hold, and which of their ranges.
    Only dense weights are reused; a quantised one is read and quantised again (the same values)."""
    prefix, held = sharding.layer_prefix(i), {}
    for f in sharding.LAYER:
        value = getattr(layer, f.name)
        if not f.linear:
            held.update(held_pieces(cfg, shard, f.weight, value, prefix))
            continue
        if not isinstance(value, Dense):
            continue
        held.update(held_pieces(cfg, shard, f.weight, value.weight, prefix))
        bias = value.bias if value.bias is not None else getattr(layer, f.name + "_bias", None)
        if bias is not None:
            held.update(held_pieces(cfg, shard, f.bias, bias, prefix))
    return held


def held_by_ends(shard: RankShard, weights) -> Held:
    """The embedding, LM head and final norm rows the rank's `weights` hold."""
    vocab = [shard.vocab_rows]
    held: Held = {}
    if weights.embed is not None:
        held[sharding.EMBED.name] = (weights.embed, 0, vocab)
    head = weights.lm_head
    if isinstance(head, Dense) and head.weight is not weights.embed:
        held[sharding.LM_HEAD.name] = (head.weight, 0, vocab)
    elif isinstance(head, Dense):  # tied: the LM head rows are the embedding's
        held[sharding.EMBED.name] = (head.weight, 0, vocab)
    if weights.final_norm is not None:
        held[sharding.FINAL_NORM.name] = (weights.final_norm, None, [])
    return held

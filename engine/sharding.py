"""The sharding layout as data: which checkpoint tensor becomes which local field, split how.

Every rank holds the same fields (`LAYER`, then `ENDS`), each built from one or more
checkpoint tensors. A tensor's shape is written in symbols; the one symbol that is a split
unit (query heads, KV heads, MLP columns, vocabulary rows) says what the tensor is split by
and along which dimension, and a rank's ranges of that unit say which slices it reads. The
loader, the balancer's reslicing and the memory accounting all read this one table.
"""

from dataclasses import dataclass

from .checkpoint import runs
from .config import ModelConfig
from .plan import RankShard

# Split units, and HIDDEN: the model width, never split.
Q, KV, COLUMN, VOCAB, HIDDEN = "q_heads", "kv_heads", "mlp_columns", "vocab_rows", "hidden"
UNITS = (Q, KV, COLUMN, VOCAB)


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor (its name after "model.layers.{i}." in a layer) with its shape in symbols."""

    name: str
    shape: tuple[str, ...]

    @property
    def unit(self) -> str | None:
        return next((s for s in self.shape if s in UNITS), None)

    @property
    def dim(self) -> int | None:
        """The dimension it is split along; None: every rank holds it whole."""
        unit = self.unit
        return None if unit is None else self.shape.index(unit)


@dataclass(frozen=True)
class Field:
    """A local field: a linear layer's weight (pieces fused along dim 0) and optional bias, or a vector.
    `bias_flag` names the ModelConfig flag that says the bias exists; a bias held whole is added once,
    after the all-reduce that joins the ranks' partial sums."""

    name: str
    weight: tuple[Piece, ...]
    bias: tuple[Piece, ...] = ()
    bias_flag: str | None = None
    linear: bool = True

    @property
    def dim(self) -> int | None:
        return self.weight[0].dim

    def has_bias(self, cfg: ModelConfig) -> bool:
        return bool(self.bias_flag and getattr(cfg, self.bias_flag))


def _attn(name: str, *shape: str) -> Piece:
    return Piece(f"self_attn.{name}", shape)


def _mlp(name: str, *shape: str) -> Piece:
    return Piece(f"mlp.{name}", shape)


LAYER = (
    Field("attn_norm", (Piece("input_layernorm.weight", (HIDDEN,)),), linear=False),
    Field("q", (_attn("q_proj.weight", Q, HIDDEN),), (_attn("q_proj.bias", Q),), "qkv_bias"),
    Field("kv", (_attn("k_proj.weight", KV, HIDDEN), _attn("v_proj.weight", KV, HIDDEN)),
          (_attn("k_proj.bias", KV), _attn("v_proj.bias", KV)), "qkv_bias"),
    Field("o", (_attn("o_proj.weight", HIDDEN, Q),), (_attn("o_proj.bias", HIDDEN),), "o_bias"),
    Field("mlp_norm", (Piece("post_attention_layernorm.weight", (HIDDEN,)),), linear=False),
    Field("gate_up", (_mlp("gate_proj.weight", COLUMN, HIDDEN), _mlp("up_proj.weight", COLUMN, HIDDEN)),
          (_mlp("gate_proj.bias", COLUMN), _mlp("up_proj.bias", COLUMN)), "mlp_bias"),
    Field("down", (_mlp("down_proj.weight", HIDDEN, COLUMN),), (_mlp("down_proj.bias", HIDDEN),), "mlp_bias"),
)

EMBED = Piece("model.embed_tokens.weight", (VOCAB, HIDDEN))
LM_HEAD = Piece("lm_head.weight", (VOCAB, HIDDEN))
FINAL_NORM = Piece("model.norm.weight", (HIDDEN,))


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def unit_width(cfg: ModelConfig, unit: str) -> int:
    """Elements of a tensor dimension per unit: a head is head_dim rows, a column or a row is one."""
    return cfg.head_dim if unit in (Q, KV) else 1


def ranges(cfg: ModelConfig, shard: RankShard, unit: str) -> list[tuple[int, int]]:
    """The rank's [start, end) element ranges along a dimension split by `unit`, in the order it stores them."""
    if unit == Q:
        return runs(shard.q_heads, cfg.head_dim)
    if unit == KV:
        return runs(shard.kv_heads, cfg.head_dim)
    return [getattr(shard, unit)]


def size(cfg: ModelConfig, symbol: str, shard: RankShard | None = None) -> int:
    """A dimension's length: the whole model's, or with `shard` the rank's."""
    if symbol == HIDDEN:
        return cfg.hidden_size
    if shard is not None:
        return sum(b - a for a, b in ranges(cfg, shard, symbol))
    whole = {Q: cfg.num_heads * cfg.head_dim, KV: cfg.num_kv_heads * cfg.head_dim,
             COLUMN: cfg.intermediate_size, VOCAB: cfg.vocab_size}
    return whole[symbol]


def shape(cfg: ModelConfig, piece: Piece, shard: RankShard | None = None) -> tuple[int, ...]:
    return tuple(size(cfg, s, shard) for s in piece.shape)


def field_shape(cfg: ModelConfig, pieces: tuple[Piece, ...], shard: RankShard) -> tuple[int, ...]:
    """A rank's fused field: its pieces' slices concatenated along dim 0."""
    shapes = [shape(cfg, p, shard) for p in pieces]
    return (sum(s[0] for s in shapes), *shapes[0][1:])


@dataclass(frozen=True)
class Read:
    """One read a rank's load makes: a tensor whole (`dim` None) or its `ranges` along `dim`, in its
    checkpoint's precision (`form` dense) or quantised as it is read (int8, int4)."""

    name: str
    dim: int | None
    ranges: tuple[tuple[int, int], ...] = ()
    form: str = "dense"


def reads(cfg: ModelConfig, plan, rank: int, weights: str, names: set[str]) -> list[Read]:
    """Every read `engine/model.py load_shard` makes for `rank`, from this table: what an agent fetches
    before a rank loads. `names`: the checkpoint's tensor names (an LM head may be absent: tied)."""
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1
    quantised = weights in ("int8", "int4")
    out = []
    for i in range(*stage.layers):
        for f in LAYER:
            for p in f.weight + (f.bias if f.has_bias(cfg) else ()):
                split = () if p.dim is None else tuple(ranges(cfg, shard, p.unit))
                form = weights if quantised and f.linear and p in f.weight else "dense"
                out.append(Read(layer_prefix(i) + p.name, p.dim, split, form))
    tied = cfg.tie_word_embeddings or LM_HEAD.name not in names
    vocab = (tuple(shard.vocab_rows),)
    if first or (last and tied and not quantised):
        out.append(Read(EMBED.name, 0, vocab))
    if last and quantised:  # the LM head is int8 for int8 and int4 weights alike
        out.append(Read(EMBED.name if tied else LM_HEAD.name, 0, vocab, "int8"))
    elif last and not tied:
        out.append(Read(LM_HEAD.name, 0, vocab))
    if last:
        out.append(Read(FINAL_NORM.name, None))
    return out

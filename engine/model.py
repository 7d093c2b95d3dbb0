"""One Llama-family transformer (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2), head-sharded.

Every rank runs this same forward on its own shard: its query heads with their
KV heads, its MLP columns and its vocabulary rows. Two all-reduces per layer
(after o_proj and after down_proj) join the partial sums; one more joins the
embedding lookup. The KV cache is static: [slots, local KV heads, context, head_dim].
Which checkpoint slices make up a shard is engine/sharding.py's table.
"""

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import quant, sharding
from .balancer import WINDOW_STEPS
from .checkpoint import SliceReader
from .config import ModelConfig
from .layers import Dense, Int4, Int8, Linear, nbytes
from .plan import Plan, RankShard
from .quant import QUANTISED
from .reslice import ReusingReader, held_by_ends, held_by_layer


@dataclass
class LayerWeights:
    """One layer of a rank's shard; the fields are engine/sharding.py's LAYER table."""

    attn_norm: torch.Tensor  # [H]
    q: Linear  # [q_local * D, H]
    kv: Linear  # [2 * kv_local * D, H]: k rows then v rows
    o: Linear  # [H, q_local * D]
    o_bias: torch.Tensor | None  # full, added once after the all-reduce
    mlp_norm: torch.Tensor  # [H]
    gate_up: Linear  # [2 * cols, H]: gate rows then up rows
    down: Linear  # [H, cols]
    down_bias: torch.Tensor | None  # full, added once after the all-reduce

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for value in vars(self).values():
            if isinstance(value, torch.Tensor):
                out.append(value)
            elif value is not None:
                out += value.tensors()
        return out


@dataclass
class ShardWeights:
    embed: torch.Tensor | None  # [vocab_local, H], on the first stage
    lm_head: Linear | None  # [vocab_local, H], on the last stage; over the embed tensor itself when tied
    final_norm: torch.Tensor | None  # [H], on the last stage
    layers: list[LayerWeights]  # this stage's layers

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.final_norm) if t is not None]
        if self.lm_head is not None:
            out += [t for t in self.lm_head.tensors() if t is not self.embed]
        for layer in self.layers:
            out += layer.tensors()
        return out

    def nbytes(self) -> int:
        return nbytes(self.tensors())


VOCAB_BLOCK = 4096  # vocabulary rows read between two rests of a paced load


def load_shard(model_dir: Path, cfg: ModelConfig, plan: Plan, rank: int, dtype: torch.dtype,
               device: torch.device, after_layer=None, reuse: "tuple[RankShard, ShardWeights] | None" = None,
               weights: str = "fp32", open_reader=SliceReader) -> "ShardWeights":
    """Read only this rank's slices of the checkpoint (never the whole model): its heads and
    columns of its stage's layers, its vocabulary rows of the embedding (first stage) and of
    the LM head (last stage). `after_layer(seconds)` is called after each layer, and after
    each block of `VOCAB_BLOCK` vocabulary rows, with the time it took: the balancer paces its
    background loads with it. With `reuse` (the rank's current shard and weights, in the same
    stage), what they hold is copied from memory and only the rest is read (engine/reslice.py).

    `weights` int8 or int4: each linear layer is quantised as it is read, one checkpoint tensor at
    a time (engine/quant.py); everything else is held in `dtype`, as dense weights are.

    `open_reader(model_dir)` gives the reader of the slices: the checkpoint's files by default, or
    anything with the same methods (an agent's cache of slices fetched from the host). What a rank
    reads is listed by `sharding.reads`.

    The files are mapped afresh for each layer: pages a column slice touches are
    released with the mapping, so peak memory stays near the shard's own size.
    """
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1
    make = Maker(cfg, shard, weights, dtype, device, plan.kv_replicated)
    put = make.put

    @contextmanager
    def reader(held):
        with open_reader(model_dir) as r:
            yield ReusingReader(r, held(*reuse)) if reuse else r

    def vocab(r, name: str) -> torch.Tensor:
        """This rank's vocabulary rows of `name`. Paced, block by block into one tensor: the
        vocabulary is a shard's largest tensor, and read at once it would crowd a decode step."""
        if after_layer is None or (reuse and reuse[0].vocab_rows == shard.vocab_rows):
            return put(r.rows(name, [shard.vocab_rows]))  # unpaced, or unchanged (then shared, not copied)
        a, b = shard.vocab_rows
        out = torch.empty(b - a, cfg.hidden_size, dtype=dtype, device=device)
        for start in range(a, b, VOCAB_BLOCK):
            t = time.perf_counter()
            end = min(start + VOCAB_BLOCK, b)
            out[start - a : end - a] = r.rows(name, [(start, end)])
            after_layer(time.perf_counter() - t)
        return out

    layers = []
    for i in range(*stage.layers):
        t = time.perf_counter()
        with reader(lambda old, w, i=i: held_by_layer(cfg, old, w.layers[i - stage.layers[0]], i)) as r:
            layers.append(load_layer(r, cfg, shard, i, make))
        if after_layer:
            after_layer(time.perf_counter() - t)
    with reader(held_by_ends) as r:
        tied = cfg.tie_word_embeddings or not r.has(sharding.LM_HEAD.name)
        # A quantised LM head is read on its own: a last stage reads the embedding only for a dense tied head.
        embed = vocab(r, sharding.EMBED.name) if first or (last and tied and weights not in QUANTISED) else None
        lm_head = None
        if last and weights in QUANTISED:  # quantised block by block; a tied embedding stays dense
            name = sharding.EMBED.name if tied else sharding.LM_HEAD.name
            lm_head = make.rows_linear(r.quantised(name, 0, [(a, min(a + VOCAB_BLOCK, shard.vocab_rows[1]))], "int8")
                                       for a in range(*shard.vocab_rows, VOCAB_BLOCK))  # read as quantised
        elif last:
            lm_head = Dense(embed if tied else vocab(r, sharding.LM_HEAD.name))
        final_norm = put(r.whole(sharding.FINAL_NORM.name)) if last else None
    if not first:
        embed = None  # the last stage read the rows only as its tied LM head
    return ShardWeights(embed=embed, lm_head=lm_head, final_norm=final_norm, layers=layers)


def read_piece(r: SliceReader, cfg: ModelConfig, shard: RankShard, piece: sharding.Piece, prefix: str = ""):
    """The rank's slice of one checkpoint tensor, as the table splits it."""
    name = prefix + piece.name
    if piece.dim is None:
        return r.whole(name)
    read = r.rows if piece.dim == 0 else r.cols
    return read(name, sharding.ranges(cfg, shard, piece.unit))


def read_field(r: SliceReader, cfg: ModelConfig, shard: RankShard, pieces, prefix: str) -> torch.Tensor:
    parts = [read_piece(r, cfg, shard, p, prefix) for p in pieces]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def load_layer(r: SliceReader, cfg: ModelConfig, shard: RankShard, i: int, make: "Maker") -> LayerWeights:
    prefix, fields = sharding.layer_prefix(i), {}
    for f in sharding.LAYER:
        if not f.linear:
            fields[f.name] = make.put(read_field(r, cfg, shard, f.weight, prefix))
            continue
        bias = make.put(read_field(r, cfg, shard, f.bias, prefix)) if f.has_bias(cfg) else None
        if f.bias and f.bias[0].dim is None:  # a whole bias of a split input: added after the all-reduce
            fields[f.name], fields[f.name + "_bias"] = make.linear(r, f, prefix, None), bias
        else:
            fields[f.name] = make.linear(r, f, prefix, bias)
    return LayerWeights(**fields)


@dataclass
class Maker:
    """Builds a rank's fields in its precision: dense tensors in `dtype`, linear layers dense or quantised."""

    cfg: ModelConfig
    shard: RankShard
    weights: str
    dtype: torch.dtype
    device: torch.device
    kv_replicated: bool = False

    def put(self, t: torch.Tensor) -> torch.Tensor:
        # Slices come back as fresh tensors (SliceReader copies what it reads): no second copy.
        return t.to(device=self.device, dtype=self.dtype).contiguous()

    def linear(self, r: SliceReader, f: sharding.Field, prefix: str, bias: torch.Tensor | None) -> Linear:
        if self.weights not in QUANTISED:
            return Dense(self.put(read_field(r, self.cfg, self.shard, f.weight, prefix)), bias)
        # Piece by piece (k then v, gate then up), so no more than one checkpoint tensor is held unquantised.
        parts = [self.quantised_piece(r, p, prefix) for p in f.weight]
        return self.kind(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts)), bias=bias,
                         split_inputs=f.dim == 1)

    def rows_linear(self, blocks) -> Linear:
        """The LM head from its row blocks, each quantised as it is read: int8 for int8 and int4 weights
        alike (a 4-bit LM head costs quality, and its dequantising sum runs slower than the int8 one)."""
        head = replace(self, weights="int8")
        parts = list(blocks)
        # Int8 dequantises in the activation dtype, not a bfloat16 kernel: logits rounded to bfloat16 would
        # move a whole bfloat16 step (0.06 at a logit of 10) on the least difference in their input.
        return head.kind(*(torch.cat(ts) if len(ts) > 1 else ts[0] for ts in zip(*parts)))

    def kind(self, *tensors, bias=None, split_inputs: bool = False) -> Linear:
        if self.weights == "int8":
            weight, scales = tensors
            return Int8(weight.to(self.device), scales.to(self.device), bias)
        form = quant.kernel_form(self.device, split_inputs)
        return Int4.build(*(t.to(self.device) for t in tensors), quant.group_size(self.cfg), form, bias)

    def quantised_piece(self, r: SliceReader, piece: sharding.Piece, prefix: str) -> tuple[torch.Tensor, ...]:
        group = quant.group_size(self.cfg) if self.weights == "int4" else None
        return r.quantised(prefix + piece.name, piece.dim, sharding.ranges(self.cfg, self.shard, piece.unit),
                           self.weights, group)


def inverse_frequencies(hf_config) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies and cos/sin scale, as transformers' LlamaRotaryEmbedding computes them
    (its rope-scaling functions for llama3, yarn, ...; the default written out as it writes it), without
    importing the Llama model module, which costs each worker a second at start."""
    params = hf_config.rope_parameters
    if params["rope_type"] != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        return ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_config)
    dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    return 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)), 1.0


def rope_tables(hf_config, context: int, dtype: torch.dtype, device: torch.device):
    """cos/sin for positions [0, context): [context, D], computed as transformers does."""
    inv_freq, scale = inverse_frequencies(hf_config)
    positions = torch.arange(context, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scale).to(device=device, dtype=dtype)
    sin = (emb.sin() * scale).to(device=device, dtype=dtype)
    return cos, sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv_block(x, norm_w, q_proj: Linear, kv_proj: Linear, cos, sin, eps: float, D: int):
    """Norm, Q and KV projections and RoPE: x [B, S, H] -> q [B, nq, S, D], k and v [B, nkv, S, D], and the
    projections' input (see `Blocks`). Head counts come from the outputs' shapes, so a compiled block
    follows the balancer's moves."""
    B, S, _ = x.shape
    h = rms_norm(x, norm_w, eps)
    q = q_proj(h)  # [B, S, nq * D]
    k, v = kv_proj(h).chunk(2, dim=-1)  # [B, S, nkv * D] each
    q = rotate(q.view(B, S, -1, D).transpose(1, 2), cos, sin)
    k = rotate(k.view(B, S, -1, D).transpose(1, 2), cos, sin)
    return q, k, v.view(B, S, -1, D).transpose(1, 2), h


def out_block(attn, o_proj: Linear):
    """attn [B, nq, S, D] -> this rank's partial sum of o_proj, [B, S, H]."""
    B, nq, S, D = attn.shape
    return o_proj(attn.transpose(1, 2).reshape(B, S, nq * D))


def mlp_block(x, norm_w, gate_up: Linear, down: Linear, eps: float):
    """Norm, fused gate/up, SiLU, down: x [B, S, H] -> this rank's partial sum [B, S, H], and the
    projections' inputs (see `Blocks`)."""
    h = rms_norm(x, norm_w, eps)
    gate, up = gate_up(h).chunk(2, dim=-1)  # [B, S, cols] each
    a = F.silu(gate) * up
    return down(a), (h, a)


def head_block(x, norm_w, lm_head: Linear, eps: float):
    """x [..., H] -> this rank's slice of the logits, and the LM head's input (see `Blocks`)."""
    h = rms_norm(x, norm_w, eps)
    return lm_head(h), h


@dataclass(frozen=True)
class Blocks:
    """The per-layer math, eager or compiled. Decode steps (one token per row) run compiled
    blocks where available; prefill runs eager, since its shapes change with every prompt.
    Compiled for a reshardable rank, the weights' sharded dimensions are marked symbolic
    (`mark_sharded`), so the balancer's moves reuse the same compiled code.

    Each block also returns the inputs of its linear layers (a norm's output, SiLU(gate) * up), which
    callers drop. A compiled graph writes its outputs to memory; a value it only uses, it may compute
    inside its consumer instead, and the compiler does so here: it would recompute the norm (or the
    SiLU) in the matrix-vector loop for every row of weights. Returned, each is computed once and read
    from memory. The dequantising sums are bound by compute, so at 1 thread the int8 MLP runs 2.2x and
    the int8 LM head 3x faster (1.1-1.2x at 2 threads); fp32 runs as fast either way (bench/fused_inputs.py)."""

    qkv: object = qkv_block
    out: object = out_block
    mlp: object = mlp_block
    head: object = head_block

    @classmethod
    def compiled(cls) -> "Blocks":
        # Static shapes: one compiled variant per batch size (with a symbolic batch size the multiply-sums
        # ran 20-30x slower), so allow one for each size up to the largest batch a server runs, and a few
        # input layouts.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        c = lambda f: torch.compile(f, dynamic=False)
        return cls(c(qkv_block), c(out_block), c(mlp_block), c(head_block))


def mark_sharded(weights: ShardWeights) -> None:
    """Mark each linear layer's split dimension (the table's) dynamic for the compiler."""
    for layer in weights.layers:
        for f in sharding.LAYER:
            if f.linear:
                getattr(layer, f.name).mark_dynamic(f.dim)
    if weights.lm_head is not None:
        weights.lm_head.mark_dynamic(sharding.LM_HEAD.dim)


@dataclass(frozen=True)
class StepInputs:
    cos: torch.Tensor  # [B, 1, S, D]: RoPE rows of each row's positions
    sin: torch.Tensor
    write_at: tuple[torch.Tensor, ...]  # (slot, KV head, position) indices of the cache entries written
    slots: torch.Tensor  # [B]
    first_slot: int | None  # when the rows' slots are consecutive, the first: the cache is read as a view
    length: int  # cache positions attended to
    mask: torch.Tensor | None  # [B, 1, S, L], None when every query sees every key


@dataclass(frozen=True)
class Slowdown:
    """A simulated slow device: compute time stretched by `factor` from forward step `from_step` on."""

    factor: float = 1.0
    from_step: int = 0


class StepClock:
    """This rank's compute time per step, without the time it waits in collectives; and, when asked,
    a slower device simulated by sleeping (factor - 1) x each compute stretch before its collective."""

    def __init__(self, slowdown: Slowdown = Slowdown()):
        self.slowdown = slowdown
        self.steps = 0  # forward steps counted so far (the warm-up is not)
        # Compute seconds of the last steps under the current plan: the balancer judges their median,
        # enough steps that a burst of noise on a shared machine does not look like a slow device.
        self.window: deque[float] = deque(maxlen=WINDOW_STEPS)
        self.recent: deque[float] = deque(maxlen=32)
        self.overslept = 0.0  # seconds the simulated slowdown's sleeps overshot, owed back

    def start(self) -> None:
        self.t0 = self.mark = time.perf_counter()
        self.waited = 0.0
        self.stretch = self.slowdown.factor if self.steps + 1 >= self.slowdown.from_step else 1.0

    @contextmanager
    def waiting(self):
        """Around a collective: the compute before it is stretched, the wait inside it not counted."""
        self._stretch_compute()
        t = time.perf_counter()
        yield
        self.mark = time.perf_counter()
        self.waited += self.mark - t

    def _stretch_compute(self) -> None:
        """Sleep (factor - 1) x the compute since the last mark. A sleep this short overshoots by
        tens to hundreds of microseconds, 61 times a step; the overshoot is owed back on the next
        sleep, so a rank slowed by 2 is 2x slower, not 2.6x."""
        if self.stretch > 1.0:
            now = time.perf_counter()
            owed = (now - self.mark) * (self.stretch - 1.0) - self.overslept
            if owed > 0:
                time.sleep(owed)
                self.overslept = time.perf_counter() - now - owed
            else:
                self.overslept = -owed

    def stop(self, counted: bool) -> None:
        self._stretch_compute()
        if counted:
            compute = time.perf_counter() - self.t0 - self.waited
            self.window.append(compute)
            self.recent.append(compute)
            self.steps += 1


class ShardedModel:
    """The forward pass of one rank, with its static KV cache."""

    def __init__(self, cfg: ModelConfig, hf_config, plan: Plan, rank: int, weights: ShardWeights, comm,
                 context: int, slots: int, dtype: torch.dtype, device: torch.device, compiled: bool = False,
                 slowdown: Slowdown = Slowdown(), reshardable: bool = False):
        self.cfg, self.comm, self.rank = cfg, comm, rank
        self.device, self.dtype = device, dtype
        self.context, self.slots = context, slots
        self.cos, self.sin = rope_tables(hf_config, context, dtype, device)
        self.eager = Blocks()
        self.decode_blocks = Blocks.compiled() if compiled else self.eager
        self.reshardable = compiled and reshardable
        self.clock = StepClock(slowdown)
        self.filled = [0] * slots  # positions written per KV slot
        self.load_memory_mb = (0.0, 0.0)  # RSS before loading and peak once loaded, set by the worker
        self.load = None  # plan -> this rank's ShardWeights, set by the worker; the balancer reloads with it
        shape = (slots, len(plan.ranks[rank].kv_heads), context, cfg.head_dim)
        caches = ([torch.zeros(shape, dtype=dtype, device=device) for _ in weights.layers],
                  [torch.zeros(shape, dtype=dtype, device=device) for _ in weights.layers])
        self.adopt(plan, weights, *caches)
        if compiled and reshardable:
            self.compile_head_counts()

    def compile_head_counts(self) -> None:
        """Compile now for one and for two KV heads per rank: the compiler treats a dimension of 1 as
        a case of its own, so a move to a single KV head would otherwise recompile mid-generation."""
        cfg, D, H = self.cfg, self.cfg.head_dim, self.cfg.hidden_size
        zeros = lambda *shape: torch.zeros(*shape, dtype=self.dtype, device=self.device)
        norm = zeros(H) + 1  # weights are ordinary tensors, activations inference tensors, as in forward
        for nkv in (1, 2):
            nq = nkv * cfg.group_size
            q, kv, o = Dense(zeros(nq * D, H)), Dense(zeros(2 * nkv * D, H)), Dense(zeros(H, nq * D))
            for linear, dim in ((q, 0), (kv, 0), (o, 1)):
                linear.mark_dynamic(dim)
            with torch.inference_mode():  # the compiled code is guarded on it, and on each tensor's kind
                x = zeros(1, 1, H)
                cos, sin = self.cos[:1].view(1, 1, 1, D).clone(), self.sin[:1].view(1, 1, 1, D).clone()
                q_out, _, _, _ = self.decode_blocks.qkv(x, norm, q, kv, cos, sin, cfg.rms_norm_eps, D)
                self.decode_blocks.out(self.heads_symbolic(q_out), o)

    def heads_symbolic(self, attn: torch.Tensor) -> torch.Tensor:
        """attn [B, nq, S, D], its head count marked symbolic like the o_proj columns it meets."""
        if self.reshardable and attn.shape[1] > 1:
            torch._dynamo.mark_dynamic(attn, 1)
        return attn

    def adopt(self, plan: Plan, weights: ShardWeights, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]):
        """Take a plan epoch's shard: at start, and when the balancer switches every rank at once."""
        cfg = self.cfg
        self.plan, self.w = plan, weights
        if self.reshardable:
            mark_sharded(weights)
        self.shard, self.stage = plan.ranks[self.rank], plan.stage_of(self.rank)
        self.first, self.last = self.shard.stage == 0, self.shard.stage == len(plan.stages) - 1
        self.nq, self.nkv = len(self.shard.q_heads), len(self.shard.kv_heads)
        self.head_ranks = plan.stages[-1].ranks  # they hold the LM head, split by vocabulary rows
        self.vocab_sizes = [plan.ranks[r].num_vocab_rows for r in self.head_ranks]
        # Which local KV head each local query head reads; uniform groups use SDPA's GQA directly.
        kv_local = {h: i for i, h in enumerate(self.shard.kv_heads)}
        kv_of_q = [kv_local[q // cfg.group_size] for q in self.shard.q_heads]
        self.gqa = self.nq % self.nkv == 0 and kv_of_q == [i * self.nkv // self.nq for i in range(self.nq)]
        self.kv_of_q = torch.tensor(kv_of_q, device=self.device)
        self.k_cache, self.v_cache = k_cache, v_cache

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.comm.stage_size == 1:
            return F.embedding(tokens, self.w.embed)
        start, end = self.shard.vocab_rows
        mine = (tokens >= start) & (tokens < end)
        x = F.embedding((tokens - start).clamp(0, end - start - 1), self.w.embed)  # [B, S, H]
        x = x * mine.unsqueeze(-1).to(x.dtype)  # zero where another rank holds the row
        self.all_reduce(x)
        return x

    def all_reduce(self, t: torch.Tensor) -> None:
        with self.clock.waiting():
            self.comm.all_reduce(t)

    def attend(self, layer: int, q, k, v, step: "StepInputs"):
        """Write k, v [B, nkv, S, D] into the cache and attend: q [B, nq, S, D] -> [B, nq, S, D]."""
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        kc.index_put_(step.write_at, k)  # every row's positions in its slot, in one write
        vc.index_put_(step.write_at, v)
        if step.first_slot is not None:  # consecutive slots (one, or a batch the scheduler packed): a view
            a, b = step.first_slot, step.first_slot + len(step.slots)
            keys, values = kc[a:b, :, : step.length], vc[a:b, :, : step.length]  # [B, nkv, L, D]
        else:
            keys, values = kc[step.slots, :, : step.length], vc[step.slots, :, : step.length]  # [B, nkv, L, D]
        if not self.gqa:
            keys, values = keys[:, self.kv_of_q], values[:, self.kv_of_q]  # [B, nq, L, D]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=self.gqa)

    def step_inputs(self, slots: list[int], starts: list[int], S: int, device) -> "StepInputs":
        """What every layer of one step shares: positions, RoPE rows, cache indices and the mask."""
        pos = torch.tensor(starts, device=device)[:, None] + torch.arange(S, device=device)  # [B, S]
        slot_t = torch.tensor(slots, device=device)
        heads = torch.arange(len(self.shard.kv_heads), device=device)
        write_at = (slot_t[:, None, None], heads[None, :, None], pos[:, None, :])  # -> [B, nkv, S]
        for slot, p in zip(slots, starts):
            self.filled[slot] = max(self.filled[slot], p + S)
        consecutive = slots == list(range(slots[0], slots[0] + len(slots)))
        return StepInputs(cos=self.cos[pos].unsqueeze(1), sin=self.sin[pos].unsqueeze(1), write_at=write_at,
                          slots=slot_t, first_slot=slots[0] if consecutive else None,
                          length=max(starts) + S, mask=self.causal_mask(starts, S, device))

    def causal_mask(self, starts: list[int], S: int, device) -> torch.Tensor | None:
        """[B, 1, S, L] boolean mask, or None when every query may see every cached key."""
        length = max(starts) + S
        window = self.cfg.sliding_window
        if S == 1 and all(p == starts[0] for p in starts) and not (window and length > window):
            return None
        query_pos = torch.tensor(starts, device=device)[:, None] + torch.arange(S, device=device)  # [B, S]
        key_pos = torch.arange(length, device=device)  # [L]
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # [B, S, L]
        if window:
            mask &= key_pos[None, None, :] > query_pos[:, :, None] - window
        return mask[:, None]

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int], all_logits: bool = False,
                counted: bool = True):
        """tokens [B, S] at positions starts[b] + i in KV slots[b] -> logits on rank 0, else None.

        Logits are [B, S, V] with `all_logits`, else [B, V] for each row's last position.
        `counted`: whether the step counts for the balancer's clock (the warm-up does not).
        """
        self.clock.start()
        try:
            return self._forward(tokens, slots, starts, all_logits)
        finally:
            self.clock.stop(counted)

    def _forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int], all_logits: bool):
        B, S = tokens.shape
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        blocks = self.decode_blocks if S == 1 else self.eager
        step = self.step_inputs(slots, starts, S, tokens.device)
        x = self.stage_input(tokens)  # [B, S, H]
        for i, lw in enumerate(self.w.layers):
            q, k, v, _ = blocks.qkv(x, lw.attn_norm, lw.q, lw.kv, step.cos, step.sin, eps, cfg.head_dim)
            y = blocks.out(self.heads_symbolic(self.attend(i, q, k, v, step)), lw.o)  # [B, S, H], partial
            self.all_reduce(y)
            x = x + (y if lw.o_bias is None else y + lw.o_bias)
            y, _ = blocks.mlp(x, lw.mlp_norm, lw.gate_up, lw.down, eps)  # [B, S, H], partial
            self.all_reduce(y)
            x = x + (y if lw.down_bias is None else y + lw.down_bias)
        logits = self.stage_output(x, blocks, all_logits)  # [B, S or 1, V] on rank 0, else None
        if logits is None or all_logits:
            return logits
        return logits[:, 0]  # [B, V]

    def stage_input(self, tokens: torch.Tensor) -> torch.Tensor:
        """The first stage embeds the tokens; a later one receives the hidden states from the one before."""
        if self.first:
            return self.embed(tokens)
        B, S = tokens.shape
        x = torch.empty(B, S, self.cfg.hidden_size, dtype=self.cos.dtype, device=tokens.device)
        with self.clock.waiting():
            self.comm.recv(x, self.plan.stages[self.shard.stage - 1].leader)
        return x

    def stage_output(self, x: torch.Tensor, blocks: Blocks, all_logits: bool) -> torch.Tensor | None:
        """Pass x [B, S, H] on to the next stage; the last stage's logits reach rank 0."""
        if not self.last and self.rank == self.stage.leader:
            with self.clock.waiting():
                for dst in self.plan.stages[self.shard.stage + 1].ranks:
                    self.comm.send(x, dst)
        rows = x.shape[1] if all_logits else 1
        if self.last:
            local, _ = blocks.head(x[:, -rows:], self.w.final_norm, self.w.lm_head, self.cfg.rms_norm_eps)
            with self.clock.waiting():
                if len(self.plan.stages) == 1:
                    return self.comm.gather_to_driver(local, self.vocab_sizes)
                self.comm.send(local, 0)
        if self.rank != 0:
            return None
        parts = []
        with self.clock.waiting():
            for src, width in zip(self.head_ranks, self.vocab_sizes, strict=True):
                part = torch.empty(x.shape[0], rows, width, dtype=x.dtype, device=x.device)
                self.comm.recv(part, src)
                parts.append(part)
        return torch.cat(parts, dim=-1)  # [B, S', V]

    def clear_slot(self, slot: int) -> None:
        """Zero a released slot so the next user's chat cannot read it."""
        for kc, vc in zip(self.k_cache, self.v_cache):
            kc[slot].zero_()
            vc[slot].zero_()
        self.filled[slot] = 0

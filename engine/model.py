"""One Llama-family transformer (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2), head-sharded.

Every rank runs this same forward on its own shard: its query heads with their
KV heads, its MLP columns and its vocabulary rows. Two all-reduces per layer
(after o_proj and after down_proj) join the partial sums; one more joins the
embedding lookup. The KV cache is static: [slots, local KV heads, context, head_dim].
"""

import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .balancer import WINDOW_STEPS
from .checkpoint import SliceReader, runs
from .config import ModelConfig
from .plan import Plan, RankShard
from .reslice import ReusingReader, held_by_ends, held_by_layer


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wq: torch.Tensor  # [q_local * D, H]
    bq: torch.Tensor | None
    wkv: torch.Tensor  # [2 * kv_local * D, H]: k rows then v rows
    bkv: torch.Tensor | None
    wo: torch.Tensor  # [H, q_local * D]
    bo: torch.Tensor | None  # full, added once after the all-reduce
    mlp_norm: torch.Tensor  # [H]
    wgu: torch.Tensor  # [2 * cols, H]: gate rows then up rows
    bgu: torch.Tensor | None
    wdown: torch.Tensor  # [H, cols]
    bdown: torch.Tensor | None


@dataclass
class ShardWeights:
    embed: torch.Tensor | None  # [vocab_local, H], on the first stage
    lm_head: torch.Tensor | None  # [vocab_local, H], on the last stage; the embed tensor itself when tied
    final_norm: torch.Tensor | None  # [H], on the last stage
    layers: list[LayerWeights]  # this stage's layers

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.embed, self.final_norm) if t is not None]
        if self.lm_head is not None and self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.layers:
            out += [t for t in vars(layer).values() if t is not None]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


VOCAB_BLOCK = 4096  # vocabulary rows read between two rests of a paced load


def load_shard(model_dir: Path, cfg: ModelConfig, plan: Plan, rank: int, dtype: torch.dtype,
               device: torch.device, after_layer=None, reuse: "tuple[RankShard, ShardWeights] | None" = None
               ) -> "ShardWeights":
    """Read only this rank's slices of the checkpoint (never the whole model): its heads and
    columns of its stage's layers, its vocabulary rows of the embedding (first stage) and of
    the LM head (last stage). `after_layer(seconds)` is called after each layer, and after
    each block of `VOCAB_BLOCK` vocabulary rows, with the time it took: the balancer paces its
    background loads with it. With `reuse` (the rank's current shard and weights, in the same
    stage), what they hold is copied from memory and only the rest is read (engine/reslice.py).

    The files are mapped afresh for each layer: pages a column slice touches are
    released with the mapping, so peak memory stays near the shard's own size.
    """
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1

    def put(t):
        # Slices come back as fresh tensors (SliceReader copies what it reads): no second copy.
        return t.to(device=device, dtype=dtype).contiguous()

    @contextmanager
    def reader(held):
        with SliceReader(model_dir) as r:
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
            layers.append(load_layer(r, cfg, shard, i, put))
        if after_layer:
            after_layer(time.perf_counter() - t)
    with reader(held_by_ends) as r:
        tied = cfg.tie_word_embeddings or not r.has("lm_head.weight")
        embed = vocab(r, "model.embed_tokens.weight") if first or (last and tied) else None
        lm_head = None
        if last:
            lm_head = embed if tied else vocab(r, "lm_head.weight")
        final_norm = put(r.whole("model.norm.weight")) if last else None
    if not first:
        embed = None  # the last stage read the rows only as its tied LM head
    return ShardWeights(embed=embed, lm_head=lm_head, final_norm=final_norm, layers=layers)


def load_layer(r: SliceReader, cfg: ModelConfig, shard: RankShard, i: int, put) -> LayerWeights:
    D = cfg.head_dim
    q_rows, kv_rows, cols = runs(shard.q_heads, D), runs(shard.kv_heads, D), [shard.mlp_columns]
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."

    def kv(kind: str):
        return torch.cat([r.rows(a + f"k_proj.{kind}", kv_rows), r.rows(a + f"v_proj.{kind}", kv_rows)])

    def gate_up(kind: str):
        return torch.cat([r.rows(m + f"gate_proj.{kind}", cols), r.rows(m + f"up_proj.{kind}", cols)])

    return LayerWeights(
        attn_norm=put(r.whole(p + "input_layernorm.weight")),
        wq=put(r.rows(a + "q_proj.weight", q_rows)),
        bq=put(r.rows(a + "q_proj.bias", q_rows)) if cfg.qkv_bias else None,
        wkv=put(kv("weight")),
        bkv=put(kv("bias")) if cfg.qkv_bias else None,
        wo=put(r.cols(a + "o_proj.weight", q_rows)),
        bo=put(r.whole(a + "o_proj.bias")) if cfg.o_bias else None,
        mlp_norm=put(r.whole(p + "post_attention_layernorm.weight")),
        wgu=put(gate_up("weight")),
        bgu=put(gate_up("bias")) if cfg.mlp_bias else None,
        wdown=put(r.cols(m + "down_proj.weight", cols)),
        bdown=put(r.whole(m + "down_proj.bias")) if cfg.mlp_bias else None,
    )


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


def proj(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + bias, w [out, in].

    Compiled, one row per sequence (decode) becomes a fused multiply-sum that streams the
    weights at memory speed, where the BLAS matrix-vector path on CPU reaches about a third
    of it (bench/decode.py). Eager, the same expression would materialise w-sized temporaries.
    """
    if x.shape[-2] == 1 and torch.compiler.is_compiling():
        y = (w * x.unsqueeze(-2)).sum(-1)  # [..., 1, out]
        return y if bias is None else y + bias
    return F.linear(x, w, bias)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def qkv_block(x, norm_w, wq, bq, wkv, bkv, cos, sin, eps: float, D: int):
    """Norm, Q and KV projections and RoPE: x [B, S, H] -> q [B, nq, S, D], k and v [B, nkv, S, D].
    Head counts come from the weights' shapes, so a compiled block follows the balancer's moves."""
    B, S, _ = x.shape
    h = rms_norm(x, norm_w, eps)
    q = proj(h, wq, bq)  # [B, S, nq * D]
    k, v = proj(h, wkv, bkv).chunk(2, dim=-1)  # [B, S, nkv * D] each
    q = rotate(q.view(B, S, -1, D).transpose(1, 2), cos, sin)
    k = rotate(k.view(B, S, -1, D).transpose(1, 2), cos, sin)
    return q, k, v.view(B, S, -1, D).transpose(1, 2)


def out_block(attn, wo):
    """attn [B, nq, S, D] -> this rank's partial sum of o_proj, [B, S, H]."""
    B, nq, S, D = attn.shape
    return proj(attn.transpose(1, 2).reshape(B, S, nq * D), wo)


def mlp_block(x, norm_w, wgu, bgu, wdown, eps: float):
    """Norm, fused gate/up, SiLU, down: x [B, S, H] -> this rank's partial sum, [B, S, H]."""
    gate, up = proj(rms_norm(x, norm_w, eps), wgu, bgu).chunk(2, dim=-1)  # [B, S, cols] each
    return proj(F.silu(gate) * up, wdown)


def head_block(x, norm_w, lm_head, eps: float):
    """x [..., H] -> this rank's slice of the logits."""
    return proj(rms_norm(x, norm_w, eps), lm_head)


@dataclass(frozen=True)
class Blocks:
    """The per-layer math, eager or compiled. Decode steps (one token per row) run compiled
    blocks where available; prefill runs eager, since its shapes change with every prompt."""

    qkv: object = qkv_block
    out: object = out_block
    mlp: object = mlp_block
    head: object = head_block

    @classmethod
    def compiled(cls, reshardable: bool = False) -> "Blocks":
        """Compiled for this rank's shapes; `reshardable`: the sharded dimensions stay symbolic, so the
        balancer's moves (other head counts, column and row ranges) reuse the same compiled code."""
        c = lambda f: torch.compile(f, dynamic=False)
        if not reshardable:
            return cls(c(qkv_block), c(out_block), c(mlp_block), c(head_block))
        return cls(symbolic(c(qkv_block), {2: 0, 3: 0, 4: 0, 5: 0}), symbolic(c(out_block), {0: 1, 1: 1}),
                   symbolic(c(mlp_block), {2: 0, 3: 0, 4: 1}), symbolic(c(head_block), {2: 0}))


def symbolic(fn, dims: dict[int, int]):
    """Call `fn` with dimension dims[i] of tensor argument i marked dynamic. A dimension of size 1
    cannot be (the compiler specialises it): a move to or from one head recompiles once."""
    def call(*args):
        for i, dim in dims.items():
            if isinstance(args[i], torch.Tensor) and args[i].shape[dim] > 1:
                torch._dynamo.mark_dynamic(args[i], dim)
        return fn(*args)

    return call


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
        self.decode_blocks = Blocks.compiled(reshardable) if compiled else self.eager
        self.clock = StepClock(slowdown)
        self.filled = [0] * slots  # positions written per KV slot
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
            wq, wkv, wo = zeros(nq * D, H), zeros(2 * nkv * D, H), zeros(H, nq * D)
            with torch.inference_mode():  # the compiled code is guarded on it, and on each tensor's kind
                x = zeros(1, 1, H)
                cos, sin = self.cos[:1].view(1, 1, 1, D).clone(), self.sin[:1].view(1, 1, 1, D).clone()
                q, _, _ = self.decode_blocks.qkv(x, norm, wq, None, wkv, None, cos, sin, cfg.rms_norm_eps, D)
                self.decode_blocks.out(q, wo)

    def adopt(self, plan: Plan, weights: ShardWeights, k_cache: list[torch.Tensor], v_cache: list[torch.Tensor]):
        """Take a plan epoch's shard: at start, and when the balancer switches every rank at once."""
        cfg = self.cfg
        self.plan, self.w = plan, weights
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

    def attend(self, layer: int, q, k, v, slots: list[int], starts: list[int], mask):
        """Write k, v [B, nkv, S, D] into the cache and attend: q [B, nq, S, D] -> [B, nq, S, D]."""
        S = q.shape[2]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        for b, (slot, p) in enumerate(zip(slots, starts)):
            kc[slot, :, p : p + S] = k[b]
            vc[slot, :, p : p + S] = v[b]
            self.filled[slot] = max(self.filled[slot], p + S)
        length = max(starts) + S
        if len(slots) == 1:
            keys = kc[slots[0] : slots[0] + 1, :, :length]  # [1, nkv, L, D], a view
            values = vc[slots[0] : slots[0] + 1, :, :length]
        else:
            index = torch.tensor(slots, device=q.device)
            keys, values = kc[index, :, :length], vc[index, :, :length]  # [B, nkv, L, D]
        if not self.gqa:
            keys, values = keys[:, self.kv_of_q], values[:, self.kv_of_q]  # [B, nq, L, D]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=self.gqa)

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
        pos = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(S, device=tokens.device)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, S, D]
        mask = self.causal_mask(starts, S, tokens.device)
        x = self.stage_input(tokens)  # [B, S, H]
        for i, lw in enumerate(self.w.layers):
            q, k, v = blocks.qkv(x, lw.attn_norm, lw.wq, lw.bq, lw.wkv, lw.bkv, cos, sin, eps, cfg.head_dim)
            y = blocks.out(self.attend(i, q, k, v, slots, starts, mask), lw.wo)  # [B, S, H], partial
            self.all_reduce(y)
            x = x + (y if lw.bo is None else y + lw.bo)
            y = blocks.mlp(x, lw.mlp_norm, lw.wgu, lw.bgu, lw.wdown, eps)  # [B, S, H], partial
            self.all_reduce(y)
            x = x + (y if lw.bdown is None else y + lw.bdown)
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
            local = blocks.head(x[:, -rows:], self.w.final_norm, self.w.lm_head, self.cfg.rms_norm_eps)
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

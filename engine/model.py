"""One Llama-family transformer (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2), head-sharded.

Every rank runs this same forward on its own shard: its query heads with their
KV heads, its MLP columns and its vocabulary rows. Two all-reduces per layer
(after o_proj and after down_proj) join the partial sums; one more joins the
embedding lookup. The KV cache is static: [slots, local KV heads, context, head_dim].
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from .checkpoint import SliceReader, runs
from .config import ModelConfig
from .plan import Plan, RankShard


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [H]
    wqkv: torch.Tensor  # [(q_local + 2 * kv_local) * D, H]
    bqkv: torch.Tensor | None
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


def load_shard(model_dir: Path, cfg: ModelConfig, plan: Plan, rank: int, dtype: torch.dtype,
               device: torch.device) -> "ShardWeights":
    """Read only this rank's slices of the checkpoint (never the whole model): its heads and
    columns of its stage's layers, its vocabulary rows of the embedding (first stage) and of
    the LM head (last stage).

    The files are mapped afresh for each layer: pages a column slice touches are
    released with the mapping, so peak memory stays near the shard's own size.
    """
    shard, stage = plan.ranks[rank], plan.stage_of(rank)
    first, last = shard.stage == 0, shard.stage == len(plan.stages) - 1

    def put(t):
        # A copy: a tensor read straight from the file would keep the whole file mapped.
        return t.to(device=device, dtype=dtype, copy=True).contiguous()

    layers = []
    for i in range(*stage.layers):
        with SliceReader(model_dir) as r:
            layers.append(load_layer(r, cfg, shard, i, put))
    with SliceReader(model_dir) as r:
        vocab = [shard.vocab_rows]
        tied = cfg.tie_word_embeddings or not r.has("lm_head.weight")
        embed = put(r.rows("model.embed_tokens.weight", vocab)) if first or (last and tied) else None
        lm_head = None
        if last:
            lm_head = embed if tied else put(r.rows("lm_head.weight", vocab))
        final_norm = put(r.whole("model.norm.weight")) if last else None
    if not first:
        embed = None  # the last stage read the rows only as its tied LM head
    return ShardWeights(embed=embed, lm_head=lm_head, final_norm=final_norm, layers=layers)


def load_layer(r: SliceReader, cfg: ModelConfig, shard: RankShard, i: int, put) -> LayerWeights:
    D = cfg.head_dim
    q_rows, kv_rows, cols = runs(shard.q_heads, D), runs(shard.kv_heads, D), [shard.mlp_columns]
    p = f"model.layers.{i}."
    a, m = p + "self_attn.", p + "mlp."

    def qkv(kind: str):
        return torch.cat([r.rows(a + f"q_proj.{kind}", q_rows), r.rows(a + f"k_proj.{kind}", kv_rows),
                          r.rows(a + f"v_proj.{kind}", kv_rows)])

    def gate_up(kind: str):
        return torch.cat([r.rows(m + f"gate_proj.{kind}", cols), r.rows(m + f"up_proj.{kind}", cols)])

    return LayerWeights(
        attn_norm=put(r.whole(p + "input_layernorm.weight")),
        wqkv=put(qkv("weight")),
        bqkv=put(qkv("bias")) if cfg.qkv_bias else None,
        wo=put(r.cols(a + "o_proj.weight", q_rows)),
        bo=put(r.whole(a + "o_proj.bias")) if cfg.o_bias else None,
        mlp_norm=put(r.whole(p + "post_attention_layernorm.weight")),
        wgu=put(gate_up("weight")),
        bgu=put(gate_up("bias")) if cfg.mlp_bias else None,
        wdown=put(r.cols(m + "down_proj.weight", cols)),
        bdown=put(r.whole(m + "down_proj.bias")) if cfg.mlp_bias else None,
    )


def rope_tables(hf_config, context: int, dtype: torch.dtype, device: torch.device):
    """cos/sin for positions [0, context): [context, D], computed as transformers does."""
    rope = LlamaRotaryEmbedding(hf_config)
    positions = torch.arange(context, dtype=torch.float32)
    freqs = positions[:, None] * rope.inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * rope.attention_scaling).to(device=device, dtype=dtype)
    sin = (emb.sin() * rope.attention_scaling).to(device=device, dtype=dtype)
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


def qkv_block(x, norm_w, wqkv, bqkv, cos, sin, eps: float, nq: int, nkv: int, D: int):
    """Norm, fused QKV projection and RoPE: x [B, S, H] -> q [B, nq, S, D], k and v [B, nkv, S, D]."""
    B, S, _ = x.shape
    qkv = proj(rms_norm(x, norm_w, eps), wqkv, bqkv)  # [B, S, (nq + 2 nkv) * D]
    q, k, v = qkv.split([nq * D, nkv * D, nkv * D], dim=-1)
    q = rotate(q.view(B, S, nq, D).transpose(1, 2), cos, sin)
    k = rotate(k.view(B, S, nkv, D).transpose(1, 2), cos, sin)
    return q, k, v.view(B, S, nkv, D).transpose(1, 2)


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
    def compiled(cls) -> "Blocks":
        c = lambda f: torch.compile(f, dynamic=False)
        return cls(c(qkv_block), c(out_block), c(mlp_block), c(head_block))


class ShardedModel:
    """The forward pass of one rank, with its static KV cache."""

    def __init__(self, cfg: ModelConfig, hf_config, plan: Plan, rank: int, weights: ShardWeights, comm,
                 context: int, slots: int, dtype: torch.dtype, device: torch.device, compiled: bool = False):
        self.cfg, self.plan, self.comm, self.w = cfg, plan, comm, weights
        self.device = device
        self.rank, self.shard, self.stage = rank, plan.ranks[rank], plan.stage_of(rank)
        self.first, self.last = self.shard.stage == 0, self.shard.stage == len(plan.stages) - 1
        self.context, self.slots = context, slots
        self.nq, self.nkv = len(self.shard.q_heads), len(self.shard.kv_heads)
        self.head_ranks = plan.stages[-1].ranks  # they hold the LM head, split by vocabulary rows
        self.vocab_sizes = [plan.ranks[r].num_vocab_rows for r in self.head_ranks]
        self.cos, self.sin = rope_tables(hf_config, context, dtype, device)
        self.eager = Blocks()
        self.decode_blocks = Blocks.compiled() if compiled else self.eager
        # Which local KV head each local query head reads; uniform groups use SDPA's GQA directly.
        kv_local = {h: i for i, h in enumerate(self.shard.kv_heads)}
        kv_of_q = [kv_local[q // cfg.group_size] for q in self.shard.q_heads]
        self.gqa = self.nq % self.nkv == 0 and kv_of_q == [i * self.nkv // self.nq for i in range(self.nq)]
        self.kv_of_q = torch.tensor(kv_of_q, device=device)
        shape = (slots, self.nkv, context, cfg.head_dim)
        self.k_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in weights.layers]
        self.v_cache = [torch.zeros(shape, dtype=dtype, device=device) for _ in weights.layers]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.comm.stage_size == 1:
            return F.embedding(tokens, self.w.embed)
        start, end = self.shard.vocab_rows
        mine = (tokens >= start) & (tokens < end)
        x = F.embedding((tokens - start).clamp(0, end - start - 1), self.w.embed)  # [B, S, H]
        x = x * mine.unsqueeze(-1).to(x.dtype)  # zero where another rank holds the row
        self.comm.all_reduce(x)
        return x

    def attend(self, layer: int, q, k, v, slots: list[int], starts: list[int], mask):
        """Write k, v [B, nkv, S, D] into the cache and attend: q [B, nq, S, D] -> [B, nq, S, D]."""
        S = q.shape[2]
        kc, vc = self.k_cache[layer], self.v_cache[layer]
        for b, (slot, p) in enumerate(zip(slots, starts)):
            kc[slot, :, p : p + S] = k[b]
            vc[slot, :, p : p + S] = v[b]
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
    def forward(self, tokens: torch.Tensor, slots: list[int], starts: list[int], all_logits: bool = False):
        """tokens [B, S] at positions starts[b] + i in KV slots[b] -> logits on rank 0, else None.

        Logits are [B, S, V] with `all_logits`, else [B, V] for each row's last position.
        """
        B, S = tokens.shape
        cfg, eps, comm = self.cfg, self.cfg.rms_norm_eps, self.comm
        blocks = self.decode_blocks if S == 1 else self.eager
        pos = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(S, device=tokens.device)
        cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)  # [B, 1, S, D]
        mask = self.causal_mask(starts, S, tokens.device)
        x = self.stage_input(tokens)  # [B, S, H]
        for i, lw in enumerate(self.w.layers):
            q, k, v = blocks.qkv(x, lw.attn_norm, lw.wqkv, lw.bqkv, cos, sin, eps, self.nq, self.nkv, cfg.head_dim)
            y = blocks.out(self.attend(i, q, k, v, slots, starts, mask), lw.wo)  # [B, S, H], partial
            comm.all_reduce(y)
            x = x + (y if lw.bo is None else y + lw.bo)
            y = blocks.mlp(x, lw.mlp_norm, lw.wgu, lw.bgu, lw.wdown, eps)  # [B, S, H], partial
            comm.all_reduce(y)
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
        self.comm.recv(x, self.plan.stages[self.shard.stage - 1].leader)
        return x

    def stage_output(self, x: torch.Tensor, blocks: Blocks, all_logits: bool) -> torch.Tensor | None:
        """Pass x [B, S, H] on to the next stage; the last stage's logits reach rank 0."""
        if not self.last and self.rank == self.stage.leader:
            for dst in self.plan.stages[self.shard.stage + 1].ranks:
                self.comm.send(x, dst)
        rows = x.shape[1] if all_logits else 1
        if self.last:
            local = blocks.head(x[:, -rows:], self.w.final_norm, self.w.lm_head, self.cfg.rms_norm_eps)
            if len(self.plan.stages) == 1:
                return self.comm.gather_to_driver(local, self.vocab_sizes)
            self.comm.send(local, 0)
        if self.rank != 0:
            return None
        parts = []
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

"""The native engine's own forward for Llama-family decoders, over a preallocated KV cache.

    dec = Decoder.for_model(hf_causal_lm)                # None for an architecture it does not know
    cache = dec.new_cache(rows, length)
    logits = dec.prefill(cache, ids, mask)               # left-padded prompts -> last logits (P, V)
    logits = dec.decode(cache, tokens, positions, slot, length)   # one token per row -> (B, V)

It reads the policy's modules in place: projections (plain, peft LoRA-wrapped, bitsandbytes 4-bit), MLPs,
the rotary embedding and the head are called as they are, so the live adapters are always the ones
generating; or, when the engine has made them, through working weights: merged (rollout/merged.py: one
matmul per projection group) or, for a 4-bit base, its NF4 codes read as 4 bits (rollout/packed4.py), which
is what a few rows per step want (the step is bound by the weights' bytes). Norms (each fused with the
residual add before it), RoPE, SwiGLU and decode attention go through Tandem's kernels (Triton on CUDA).
What it replaces is HF's attention plumbing: K and V go into fixed-size per-layer buffers at a slot that is
the same for every row (prompts are left-padded), and a boolean `valid` mask per row says which slots hold
real tokens. Every tensor has a fixed shape for a given (rows, attended length), which is what lets the
engine capture decode steps in CUDA graphs.

Families: llama, qwen2, qwen3 (per-head q/k norms), mistral (sliding window as a mask over slots).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels import rms_norm
from kernels.decode_attention import decode_attention
from kernels.rms_norm import add_rms_norm
from kernels.rope import rope_and_store_kv
from kernels.swiglu import swiglu_concatenated
from rl.logprobs import positions_from_mask

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass
class KVCache:
    keys: list[torch.Tensor]  # per layer (rows, kv heads, length, head dim)
    values: list[torch.Tensor]
    valid: torch.Tensor  # (rows, length) bool: the slot holds a token of this row

    @property
    def rows(self) -> int:
        return self.valid.shape[0]

    @property
    def length(self) -> int:
        return self.valid.shape[1]

    def select_rows(self, keep: torch.Tensor) -> None:
        """Move rows `keep` to the front (in place, same buffers: captured graphs stay valid)."""
        k = keep.numel()
        for buf in (*self.keys, *self.values, self.valid):
            buf[:k] = buf.index_select(0, keep)

    def pack(self, rows: int) -> int:
        """Rows 0..rows-1's valid slots moved to the front of each row, in their order (a token's K holds its
        position already, rotated in: the slot it sits in does not matter) -> the first slot no row uses."""
        valid = self.valid[:rows]
        order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices  # valid slots first
        for buf in (*self.keys, *self.values):
            index = order[:, None, :, None].expand(rows, buf.shape[1], buf.shape[2], buf.shape[3])
            buf[:rows] = buf[:rows].gather(2, index)
        counts = valid.sum(1)
        self.valid[:rows] = torch.arange(self.length, device=valid.device)[None, :] < counts[:, None]
        return int(counts.max())


class Decoder:
    def __init__(self, lm):
        self.lm = lm
        self.body = lm.model
        cfg = lm.config
        self.layers = list(self.body.layers)
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.qk_norm = hasattr(self.layers[0].self_attn, "q_norm")
        self.merged = None  # rollout.merged.MergedWeights, set by the engine when it merges LoRA for decoding
        self.packed = None  # rollout.packed4.PackedNF4Weights, set by the engine for a 4-bit base on the GPU

    @classmethod
    def for_model(cls, model) -> Decoder | None:
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        cfg = getattr(lm, "config", None)
        if getattr(cfg, "model_type", None) not in FAMILIES or not hasattr(lm, "model"):
            return None
        layers = getattr(lm.model, "layers", None)
        if not layers or not hasattr(lm.model, "rotary_emb"):
            return None
        if getattr(cfg, "use_sliding_window", False) and cfg.model_type != "mistral":
            return None  # Qwen2's per-layer windows: HF's forward handles them
        if (getattr(cfg, "rope_scaling", None) or {}).get("rope_type") == "dynamic":
            return None  # its frequencies depend on the sequence length seen, on the host
        attn = layers[0].self_attn
        if not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):
            return None
        return cls(lm)

    @property
    def dtype(self) -> torch.dtype:
        return self.body.embed_tokens.weight.dtype

    @property
    def vocab_size(self) -> int:
        return self.lm.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.body.embed_tokens.weight.device

    def new_cache(self, rows: int, length: int) -> KVCache:
        shape = (rows, self.n_kv, length, self.head_dim)
        make = lambda: torch.zeros(shape, dtype=self.dtype, device=self.device)  # noqa: E731
        return KVCache([make() for _ in self.layers], [make() for _ in self.layers],
                       torch.zeros((rows, length), dtype=torch.bool, device=self.device))

    def kv_bytes_per_token(self) -> int:
        return 2 * len(self.layers) * self.n_kv * self.head_dim * torch.finfo(self.dtype).bits // 8

    # ------------------------------------------------------------------ the two entry points

    def prefill(self, cache: KVCache, ids: torch.Tensor, mask: torch.Tensor, start: int = 0,
                first_positions: torch.Tensor | None = None) -> torch.Tensor:
        """ids, mask (P, W), left-padded, into cache rows 0..P-1, slots start..start+W-1 -> last logits (P, V).
        start > 0 extends conversations already in the cache (a multi-turn rollout's next turn): the new tokens
        attend to every valid slot before `start` in their row, and `first_positions` (P,) is the position
        of each row's first real new token (the tokens it already has)."""
        p, w = ids.shape
        mask = mask.bool()
        positions = positions_from_mask(mask.long())
        if first_positions is not None:
            positions = positions + first_positions[:, None]
        causal = torch.ones((w, w), dtype=torch.bool, device=ids.device).tril()
        attend = causal[None] & mask[:, None, :]  # (P, W queries, W keys)
        if self.window is not None:
            attend &= ~torch.ones((w, w), dtype=torch.bool, device=ids.device).tril(-self.window)[None]
        attend |= torch.eye(w, dtype=torch.bool, device=ids.device)[None]  # a pad query sees itself: no NaN rows
        if start:  # what the rows hold already, for every query (a pad query's output is never read)
            attend = torch.cat([cache.valid[:p, None, :start].expand(p, w, start), attend], dim=2)
        cache.valid[:p, start:start + w] = mask
        slots = torch.arange(start, start + w, device=ids.device)
        return self._head(*self._layers(cache, self.body.embed_tokens(ids), positions, slots, attend[:, None], p,
                                        start + w))

    def decode(self, cache: KVCache, tokens: torch.Tensor, positions: torch.Tensor, slot: torch.Tensor,
               length: int) -> torch.Tensor:
        """tokens, positions (B,) at slot (a 1-element device tensor) of rows 0..B-1, attending to the first
        `length` slots -> logits (B, V). No host synchronization: safe to capture in a CUDA graph."""
        b = tokens.shape[0]
        cache.valid[:b].index_fill_(1, slot, True)
        valid = cache.valid[:b, :length]
        if self.window is not None:
            valid = valid & (torch.arange(length, device=slot.device) > slot - self.window)
        return self._head(*self._layers(cache, self.body.embed_tokens(tokens[:, None]), positions[:, None], slot,
                                        valid[:, None, None, :], b, length))

    # ------------------------------------------------------------------ the layers

    PACKED_MAX_TOKENS = 16  # up to here a step is bound by the weights' bytes: read them as 4 bits

    def working_weights(self, tokens: int):
        """Per-layer projections for a forward over `tokens` tokens, or None for the policy's modules."""
        if self.packed is not None and (tokens <= self.PACKED_MAX_TOKENS or self.merged is None):
            return self.packed.layers
        return self.merged.layers if self.merged is not None else None

    def _layers(self, cache, h, positions, slots, attend, rows, length):
        """-> (h, pending): the residual stream before the last layer's MLP output `pending` is added (the
        caller adds it together with the final norm, for the positions it needs)."""
        cos, sin = self.body.rotary_emb(h, positions)
        working = self.working_weights(h.shape[0] * h.shape[1])
        pending = None  # the branch output not yet added to h: each add is fused with the norm after it
        for i, layer in enumerate(self.layers):
            w = working[i] if working is not None else None
            h, x = _add_norm(layer.input_layernorm, h, pending)
            pending = self._attention(layer.self_attn, w, x, cos, sin, cache.keys[i], cache.values[i], slots,
                                      attend, rows, length)
            h, x = _add_norm(layer.post_attention_layernorm, h, pending)
            pending = self._mlp(w, x) if w is not None else layer.mlp(x)
        return h, pending

    def _head(self, h, pending):
        """Logits of the last position."""
        _, x = _add_norm(self.body.norm, h[:, -1].contiguous(), pending[:, -1].contiguous())
        return self.lm.lm_head(x)

    def _qkv(self, attn, w, x):
        if w is None:
            return attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        qkv = w.qkv(x)
        return qkv.split([self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], -1)

    def _mlp(self, w, x):
        return w.down(swiglu_concatenated(w.gate_up(x)))

    def _attention(self, attn, w, x, cos, sin, k_cache, v_cache, slots, attend, rows, length):
        b, t, _ = x.shape
        q, k, v = self._qkv(attn, w, x)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv, self.head_dim)
        v = v.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = _norm(attn.q_norm, q), _norm(attn.k_norm, k)
        q = rope_and_store_kv(q.transpose(1, 2), k.transpose(1, 2), v, cos, sin, k_cache, v_cache, slots)
        group = self.n_heads // self.n_kv
        if t == 1:
            # the query heads that share a KV head become that head's queries (no copy of K and V), the keys
            # split across the GPU (flash-decoding), the slot mask read as it is
            out = decode_attention(q.reshape(b, self.n_kv, group, self.head_dim), k_cache, v_cache,
                                   attend[:, 0, 0, :], self.scale)
        else:
            keys, values = k_cache[:rows, :, :length], v_cache[:rows, :, :length]
            out = F.scaled_dot_product_attention(q, keys.repeat_interleave(group, 1),
                                                 values.repeat_interleave(group, 1), attn_mask=attend,
                                                 scale=self.scale)
        out = out.reshape(b, self.n_heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
        return attn.o_proj(out) if w is None else w.o(out)


def _add_norm(module, h, delta):
    """(h + delta, norm(h + delta)), fused into one kernel for HF's RMSNorm modules; delta None: (h, norm(h))."""
    if delta is None:
        return h, _norm(module, h)
    if hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
        return add_rms_norm(h, delta, module.weight, module.variance_epsilon)
    h = h + delta
    return h, module(h)


def _norm(module, x):
    """HF's RMSNorm modules through Tandem's kernel (one launch instead of eight); others as they are."""
    if hasattr(module, "variance_epsilon") and getattr(module, "weight", None) is not None:
        return rms_norm(x, module.weight, module.variance_epsilon)
    return module(x)

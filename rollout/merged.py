"""Merged working weights for decoding: each projection's base weight (dequantized when it is 4-bit) plus its
live LoRA delta, in the compute dtype, with q/k/v and gate/up concatenated so that each is one matmul.

    merged = MergedWeights.build(decoder)     # allocates; None when a layer cannot be merged (e.g. DoRA)
    merged.refresh()                          # before each rollout: the adapters have moved since

A decode step through the policy's modules launches ~86 small kernels per layer (each LoRA projection is a
base matmul, two adapter matmuls, a scale and an add); through merged weights it is one matmul per
projection group. The cost is a copy of the projections in the compute dtype (2.6 GB for a 1.5B model in
bf16), refreshed in place (same buffers, so captured CUDA graphs stay valid) by one kernel per projection
on the GPU (kernels/merge_lora.py: the base, dequantized when 4-bit, plus scale * B A, rounded once).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.backend import use_triton
from kernels.merge_lora import merge_lora_into


def _base(linear):
    """The module holding the frozen weight: peft's base_layer when LoRA-wrapped."""
    return getattr(linear, "base_layer", linear)


def dense_weight(linear, dtype: torch.dtype) -> torch.Tensor:
    """The base weight (out, in) in `dtype`, dequantized from bitsandbytes 4-bit when it is."""
    w = _base(linear).weight
    state = getattr(w, "quant_state", None)
    if state is None:
        return w.to(dtype)
    if w.is_cuda:
        from kernels.nf4 import dequantize_nf4

        return dequantize_nf4(w, state).to(dtype)
    import bitsandbytes.functional as bnbf  # knows its CPU-packed layout too

    return bnbf.dequantize_4bit(w, state).to(dtype)


def lora_active(linear) -> bool:
    """peft applies this layer's adapters in its forward (they exist, are enabled and not merged in)."""
    return hasattr(linear, "lora_A") and not getattr(linear, "disable_adapters", False) and \
        not getattr(linear, "merged", False)


def adapter_names(linear) -> list[str]:
    """The active adapters this (peft LoRA) layer has, enabled or not; [] for a plain layer."""
    if not hasattr(linear, "lora_A"):
        return []
    return [a for a in linear.active_adapters if a in linear.lora_A]


def lora_delta(linear) -> torch.Tensor | None:
    """sum over active adapters of scale * B @ A, as peft applies them (None when there are none)."""
    if not lora_active(linear):
        return None
    delta = None
    for name in adapter_names(linear):
        a, b = linear.lora_A[name].weight, linear.lora_B[name].weight
        d = (b.float() @ a.float()) * linear.scaling[name]
        delta = d if delta is None else delta + d
    return delta


def mergeable(linear) -> bool:
    if not hasattr(linear, "lora_A"):
        return isinstance(_base(linear), torch.nn.Linear)
    if any(getattr(linear, "use_dora", {}).get(n, False) for n in linear.active_adapters):
        return False  # DoRA rescales columns by a norm of the merged weight: not a plain sum
    return hasattr(_base(linear), "weight")


class DenseProjection:
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight, self.bias = weight, bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass
class LayerWeights:
    qkv: DenseProjection  # (q + k + v outputs, hidden)
    o: DenseProjection
    gate_up: DenseProjection  # (2 x intermediate, hidden)
    down: DenseProjection


class MergedWeights:
    def __init__(self, decoder, layers: list[LayerWeights]):
        self.decoder = decoder
        self.layers = layers

    @staticmethod
    def groups(layer):
        attn, mlp = layer.self_attn, layer.mlp
        return ([attn.q_proj, attn.k_proj, attn.v_proj], [attn.o_proj], [mlp.gate_proj, mlp.up_proj],
                [mlp.down_proj])

    @classmethod
    def nbytes(cls, decoder) -> int:
        size = torch.finfo(decoder.dtype).bits // 8
        return sum(_base(m).in_features * _base(m).out_features * size
                   for layer in decoder.layers for group in cls.groups(layer) for m in group)

    @classmethod
    def build(cls, decoder) -> MergedWeights | None:
        if getattr(decoder.lm.config, "hidden_act", "silu") != "silu":
            return None
        for layer in decoder.layers:
            if not hasattr(layer.mlp, "gate_proj") or not all(mergeable(m) for g in cls.groups(layer) for m in g):
                return None
        merged = cls(decoder, [])
        for layer in decoder.layers:
            qkv, o, gate_up, down = cls.groups(layer)
            merged.layers.append(LayerWeights(DenseProjection(merged._cat(qkv), merged._bias(qkv)),
                                              *(DenseProjection(merged._cat(g)) for g in (o, gate_up, down))))
        return merged

    def _cat(self, group) -> torch.Tensor:
        rows = sum(_base(m).out_features for m in group)
        buf = torch.empty((rows, _base(group[0]).in_features), dtype=self.decoder.dtype,
                          device=self.decoder.device)
        self._fill(group, buf)
        return buf

    def _fill(self, group, buf: torch.Tensor) -> None:
        start = 0
        for m in group:
            n = _base(m).out_features
            self._write(m, buf[start:start + n])
            start += n

    def _write(self, linear, out: torch.Tensor) -> None:
        """out = base + live LoRA delta: one kernel launch for the usual single adapter on the GPU."""
        adapters = adapter_names(linear) if lora_active(linear) else []
        w = _base(linear).weight
        state = getattr(w, "quant_state", None)
        if len(adapters) == 1 and use_triton(out) and not getattr(state, "packing_format_for_cpu", False):
            a = adapters[0]
            merge_lora_into(out, w, linear.lora_A[a].weight, linear.lora_B[a].weight, linear.scaling[a], state)
        else:
            out.copy_(self._one(linear))

    def _one(self, linear) -> torch.Tensor:
        delta = lora_delta(linear)
        if delta is None:
            return dense_weight(linear, self.decoder.dtype)
        return (dense_weight(linear, torch.float32) + delta).to(self.decoder.dtype)  # rounded once

    def _bias(self, group) -> torch.Tensor | None:
        biases = [_base(m).bias for m in group]
        if all(b is None for b in biases):
            return None
        return torch.cat([b.to(self.decoder.dtype) if b is not None else
                          torch.zeros(_base(m).out_features, dtype=self.decoder.dtype, device=self.decoder.device)
                          for b, m in zip(biases, group)])

    def refresh(self) -> None:
        """Recompute every merged weight in place from the live modules (same buffers: captured CUDA graphs
        stay valid)."""
        for layer, weights in zip(self.decoder.layers, self.layers):
            for group, proj in zip(self.groups(layer), (weights.qkv, weights.o, weights.gate_up, weights.down)):
                self._fill(group, proj.weight)

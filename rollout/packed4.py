"""4-bit working weights for decoding a QLoRA policy: its NF4 codes read as 4 bits by kernels/nf4_matmul.py,
with the live LoRA path's second matmul fused into it.

    packed = PackedNF4Weights.build(decoder)   # None unless every projection is bitsandbytes NF4 on the GPU
    packed.refresh()                           # before each rollout: copies the live adapters in place

Per layer and projection group (q/k/v, o, gate/up, down) it keeps:
  - the group's codes concatenated along the output dimension (bitsandbytes flattens each (out, in) weight
    row-major into blocks of 64 within a row, so concatenating the packed bytes is concatenating the rows);
    the policy's weights then become views of that buffer, so the codes still exist once; and the scales with
    double quantization undone once, in fp32 (1/16 byte per weight more than the nested uint8 scales);
  - A of every member (and active adapter) stacked, and B as a block-diagonal matrix with the LoRA scale
    folded in, R columns padded to a power of two >= 16. u = x A^T is one small matmul for the group.
So a decode step reads about 0.56 bytes per weight instead of the 2 of merged bf16 weights, in two or three
launches per projection group (u = x A^T; the matmul with B fused; the sum of K slices when K is split).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.backend import use_triton
from kernels.nf4 import absmax_fp32
from kernels.nf4_matmul import nf4_matmul
from rollout.merged import _base, adapter_names, lora_active


class NF4Projection:
    """A projection group as one NF4 matmul plus its fused low-rank path."""

    def __init__(self, group, dtype: torch.dtype):
        states = [_base(m).weight.quant_state for m in group]
        self.group = group
        self.out_features = sum(s.shape[0] for s in states)
        self.blocksize = states[0].blocksize
        self.code = states[0].code.float()
        self.packed = _concatenate_in_place([_base(m).weight for m in group])
        self.absmax = torch.cat([absmax_fp32(s) for s in states])
        biases = [_base(m).bias for m in group]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [b.to(dtype) if b is not None else torch.zeros(s.shape[0], dtype=dtype, device=self.code.device)
             for b, s in zip(biases, states)])
        rank = sum(m.lora_A[a].weight.shape[0] for m in group for a in adapter_names(m))
        self.rank = max(16, 1 << max(0, rank - 1).bit_length()) if rank else 0
        in_features = states[0].shape[1]
        self.lora_a = torch.zeros((self.rank, in_features), dtype=dtype, device=self.code.device) if rank else None
        self.lora_b = (torch.zeros((self.out_features, self.rank), dtype=dtype, device=self.code.device)
                       if rank else None)
        self.refresh()

    def refresh(self) -> None:
        """Copy the live adapters in place (same buffers: captured CUDA graphs stay valid)."""
        if self.lora_a is None:
            return
        row, col = 0, 0
        for m in self.group:
            n = _base(m).weight.quant_state.shape[0]
            for a in adapter_names(m):
                wa, wb = m.lora_A[a].weight, m.lora_B[a].weight
                r = wa.shape[0]
                if col + r > self.rank:
                    raise RuntimeError("the active adapters changed since the 4-bit decode weights were built; "
                                       "call the engine's release() to rebuild them")
                if lora_active(m):
                    self.lora_a[col:col + r].copy_(wa)
                    self.lora_b[row:row + n, col:col + r].copy_(wb.float() * m.scaling[a])
                else:  # disabled adapters contribute nothing
                    self.lora_a[col:col + r].zero_()
                    self.lora_b[row:row + n, col:col + r].zero_()
                col += r
            row += n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        u = F.linear(x, self.lora_a) if self.lora_a is not None else None
        return nf4_matmul(x, self.packed, self.absmax, self.code, self.out_features, u, self.lora_b, self.bias,
                          self.blocksize)


def _concatenate_in_place(weights) -> torch.Tensor:
    """One flat buffer of the group's packed codes, which then also backs each policy weight (its data becomes
    a view of its rows), so the codes exist once. A group of one is its own weight's storage."""
    if len(weights) == 1:
        return weights[0].data.reshape(-1)
    flat = torch.cat([w.data.reshape(-1) for w in weights])
    start = 0
    for w in weights:
        n = w.data.numel()
        w.data = flat[start:start + n].view(w.data.shape)  # the Parameter and its quant_state stay the same
        start += n
    return flat


def _packable(linear) -> bool:
    w = getattr(_base(linear), "weight", None)
    state = getattr(w, "quant_state", None)
    if state is None or state.quant_type != "nf4" or getattr(state, "packing_format_for_cpu", False):
        return False
    if state.shape[1] % state.blocksize or not use_triton(w):
        return False  # a block would straddle two rows; or no kernel for this device
    return not any(getattr(linear, "use_dora", {}).get(a, False) for a in adapter_names(linear))


class PackedLayer:
    def __init__(self, groups, dtype):
        self.qkv, self.o, self.gate_up, self.down = (NF4Projection(g, dtype) for g in groups)


class PackedNF4Weights:
    def __init__(self, layers: list[PackedLayer]):
        self.layers = layers

    @classmethod
    def build(cls, decoder) -> PackedNF4Weights | None:
        from rollout.merged import MergedWeights

        if getattr(decoder.lm.config, "hidden_act", "silu") != "silu":
            return None
        groups = []
        for layer in decoder.layers:
            if not hasattr(layer.mlp, "gate_proj"):
                return None
            layer_groups = MergedWeights.groups(layer)
            if not all(_packable(m) for g in layer_groups for m in g):
                return None
            if not all(_same_codes(g) for g in layer_groups):
                return None  # one code table and block size per concatenated group
            groups.append(layer_groups)
        return cls([PackedLayer(g, decoder.dtype) for g in groups])

    def nbytes(self) -> int:
        """What a decode step reads of these weights: codes, scales, adapters and biases."""
        return sum(t.numel() * t.element_size() for layer in self.layers
                   for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
                   for t in (p.packed, p.absmax, p.lora_a, p.lora_b, p.bias) if t is not None)

    def refresh(self) -> None:
        for layer in self.layers:
            for proj in (layer.qkv, layer.o, layer.gate_up, layer.down):
                proj.refresh()


def _same_codes(group) -> bool:
    states = [_base(m).weight.quant_state for m in group]
    return all(s.blocksize == states[0].blocksize and torch.equal(s.code, states[0].code) for s in states)

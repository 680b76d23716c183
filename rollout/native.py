"""Tandem's native rollout engine: batched generation with the policy's own modules.

    engine = NativeEngine(model, tokenizer)      # HF causal LM, maybe peft-wrapped, maybe 4-bit
    outs = engine.generate(prompt_token_ids, SamplingParams(max_tokens=64, temperature=1.0, n=8, seed=0))

It reads the policy's weights in place (base and live LoRA adapters), so no weight sync is ever needed.
Prompts are left-padded and prefilled once; their KV cache is then repeated for the `n` samples of each
prompt. Position ids come from the attention mask, exactly as in HF `generate` and in the trainer's forward,
so greedy output equals `generate` token for token and sampling log-probabilities match the trainer's.
Rows that finish are removed from the batch (and the KV cache) so that late steps run on the live rows only.

This first version runs the HF forward with a dynamic cache; later versions replace the decode step with
CUDA graphs and a fused 4-bit GEMV without changing this interface.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rollout.engine import Completion, SamplingParams


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to (rows, V) logits; filtered entries become -inf (fp32)."""
    z = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < z.shape[-1]:
        kth = torch.topk(z, params.top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        probs = torch.softmax(sorted_z, dim=-1)
        # drop a token when the mass of the tokens before it already reaches top_p (the first always stays)
        drop_sorted = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        z = z.masked_fill(drop, float("-inf"))
    return z


def sample_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None):
    """-> (tokens (rows,), logprobs (rows,)) under the distribution sampled from. Greedy when temperature=0."""
    if params.temperature == 0:
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens = torch.argmax(logits, dim=-1)
    else:
        logp = torch.log_softmax(filter_logits(logits, params), dim=-1)
        # Gumbel-max in its exponential form: argmax p / E with E ~ Exp(1) samples from p, with no host sync
        noise = torch.empty_like(logp).exponential_(generator=generator)
        tokens = torch.argmax(logp.exp() / noise, dim=-1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)


def _stop_ids(model, tokenizer, params: SamplingParams) -> list[int]:
    if params.stop_token_ids is not None:
        return list(params.stop_token_ids)
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


class NativeEngine:
    def __init__(self, model, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (model.generation_config.pad_token_id or 0)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.inference_mode():
                tokens, logps, lengths, stopped = self._generate(prompt_token_ids, params)
        finally:
            self.model.train(was_training)
        return self._completions(tokens, logps, lengths, stopped, len(prompt_token_ids), params.n)

    def _prefill(self, prompts: list[list[int]]):
        """Left-padded prompts -> (last logits (P, V), cache, attention mask (P, L), next positions (P,))."""
        lens = torch.tensor([len(p) for p in prompts])
        width = int(lens.max())
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)  # (P, L)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], cache, mask, lens.to(self.device)

    def _generate(self, prompts: list[list[int]], params: SamplingParams):
        logits, cache, mask, next_pos = self._prefill(prompts)
        n = params.n
        if n > 1:  # the prompt's KV is computed once and shared by its n samples
            cache.batch_repeat_interleave(n)
            logits, mask, next_pos = (t.repeat_interleave(n, dim=0) for t in (logits, mask, next_pos))
        rows = len(prompts) * n
        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stop_ids = torch.tensor(_stop_ids(self.model, self.tokenizer, params), device=self.device)
        out_tokens = torch.full((rows, params.max_tokens), self.pad_id, dtype=torch.long, device=self.device)
        out_logps = torch.zeros((rows, params.max_tokens), dtype=torch.float32, device=self.device)
        lengths = torch.full((rows,), params.max_tokens, dtype=torch.long, device=self.device)
        stopped = torch.zeros(rows, dtype=torch.bool, device=self.device)
        alive = torch.arange(rows, device=self.device)  # output row of each live batch row
        for t in range(params.max_tokens):
            tok, lp = sample_tokens(logits, params, generator)
            out_tokens[alive, t] = tok
            out_logps[alive, t] = lp
            done = torch.isin(tok, stop_ids)
            if t == params.max_tokens - 1:
                stopped[alive[done]] = True
                break
            if done.any():
                lengths[alive[done]] = t + 1
                stopped[alive[done]] = True
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                cache.batch_select_indices(keep)
                alive, tok, mask, next_pos = alive[keep], tok[keep], mask[keep], next_pos[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos[:, None],
                             past_key_values=cache, use_cache=True)
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return out_tokens.cpu(), out_logps.cpu(), lengths.cpu(), stopped.cpu()

    def _completions(self, tokens, logps, lengths, stopped, num_prompts: int, n: int) -> list[list[Completion]]:
        outs: list[list[Completion]] = []
        for p in range(num_prompts):
            group = []
            for r in range(p * n, (p + 1) * n):
                k = int(lengths[r])
                ids = tokens[r, :k].tolist()
                text = self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else None
                group.append(Completion(ids, logps[r, :k].tolist(), "stop" if stopped[r] else "length", text))
            outs.append(group)
        return outs

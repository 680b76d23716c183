"""Tandem's native rollout engine: batched generation with the policy's own modules.

    engine = NativeEngine(model, tokenizer)      # HF causal LM, maybe peft-wrapped, maybe 4-bit
    outs = engine.generate(prompt_token_ids, SamplingParams(max_tokens=64, temperature=1.0, n=8, seed=0))

It reads the policy's weights in place (base and live LoRA adapters), so no weight sync is ever needed.
Prompts are left-padded and prefilled once; their KV is then copied to the `n` samples of each prompt.
Position ids come from the attention mask, exactly as in HF `generate` and in the trainer's forward, so
greedy output equals `generate` token for token and sampling log-probabilities match the trainer's.

For Llama-family models (rollout/decoder.py) the KV cache is preallocated for the whole rollout and kept
between rollouts; each decode step has fixed shapes for its (batch bucket, attended length), and on CUDA it
is captured once in a CUDA graph and replayed, so a step costs the GPU's time, not Python's. Sampling runs
on the device with no host synchronization per token; every `check_every` steps the host looks at how many
rows are still running, stops when none are, and moves the live rows into a smaller batch bucket when at
most half of the current one is live. Other architectures run HF's forward with a dynamic cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rollout.decoder import Decoder, KVCache
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


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()  # the next power of two


class NativeEngine:
    def __init__(self, model, tokenizer=None, cuda_graphs: bool = True, check_every: int = 8,
                 length_bucket: int = 256):
        self.model = model
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (model.generation_config.pad_token_id or 0)
        self.decoder = Decoder.for_model(model)
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        self.length_bucket = length_bucket
        self.cache: KVCache | None = None
        self._graphs: dict = {}
        self._pool = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams) -> list[list[Completion]]:
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                run = self._generate_static if self.decoder is not None else self._generate
                tokens, logps, lengths, stopped = run(prompt_token_ids, params)
        finally:
            self.model.train(was_training)
        return self._completions(tokens, logps, lengths, stopped, len(prompt_token_ids), params.n)

    def release(self) -> None:
        """Free the KV cache and the captured graphs (the next rollout allocates and captures again)."""
        self.cache, self._graphs, self._pool = None, {}, None

    # ------------------------------------------------------------------ static cache, CUDA graphs

    def _left_padded(self, prompts: list[list[int]]):
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = True
        return ids.to(self.device), mask.to(self.device)

    def _cache_for(self, rows: int, length: int) -> KVCache:
        dec = self.decoder
        fits = self.cache is not None and self.cache.rows >= rows and self.cache.length >= length
        if not fits or self.cache.keys[0].dtype != dec.dtype:
            self.release()  # graphs point into the old buffers
            self.cache = dec.new_cache(rows, length)
        self.cache.valid.zero_()
        return self.cache

    def _generate_static(self, prompts: list[list[int]], params: SamplingParams):
        dec, n, dev = self.decoder, params.n, self.device
        ids, mask = self._left_padded(prompts)
        width = ids.shape[1]
        rows = len(prompts) * n
        batch = _bucket(rows)
        cache = self._cache_for(batch, width + params.max_tokens)
        logits = dec.prefill(cache, ids, mask)
        positions = mask.sum(-1)  # the next token's position in each prompt
        if n > 1:  # the prompt's KV is computed once and copied to its n samples
            for buf in (*cache.keys, *cache.values):
                buf[:rows, :, :width] = buf[:len(prompts), :, :width].repeat_interleave(n, 0)
            cache.valid[:rows, :width] = cache.valid[:len(prompts), :width].repeat_interleave(n, 0)
            logits, positions = logits.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
        # rows beyond `rows` up to the bucket are placeholders: finished from the start, written to a
        # scratch output row (index `rows`)
        pad_rows = batch - rows
        logits = torch.cat([logits, logits.new_zeros((pad_rows, logits.shape[1]))])
        positions = torch.cat([positions, positions.new_zeros(pad_rows)])
        out_row = torch.cat([torch.arange(rows, device=dev), torch.full((pad_rows,), rows, device=dev)])
        finished = out_row == rows

        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=dev).manual_seed(params.seed)
        stop_ids = torch.tensor(_stop_ids(self.model, self.tokenizer, params), device=dev, dtype=torch.long)
        out_tokens = torch.full((rows + 1, params.max_tokens), self.pad_id, dtype=torch.long, device=dev)
        out_logps = torch.zeros((rows + 1, params.max_tokens), dtype=torch.float32, device=dev)
        lengths = torch.full((rows + 1,), params.max_tokens, dtype=torch.long, device=dev)
        stopped = torch.zeros(rows + 1, dtype=torch.bool, device=dev)
        for t in range(params.max_tokens):
            tok, lp = sample_tokens(logits, params, generator)
            newly = ~finished & torch.isin(tok, stop_ids)
            out_tokens[out_row, t] = torch.where(finished, self.pad_id, tok)
            out_logps[out_row, t] = torch.where(finished, 0.0, lp)
            lengths[out_row] = torch.where(newly, t + 1, lengths[out_row])
            stopped[out_row] |= newly
            finished = finished | newly
            if t == params.max_tokens - 1:
                break
            if (t + 1) % self.check_every == 0:
                live = (~finished).nonzero().squeeze(1)  # the one host synchronization, every few steps
                if live.numel() == 0:
                    break
                if live.numel() <= tok.shape[0] // 2:
                    tok, positions, out_row, finished = self._compact(cache, live, tok, positions, out_row, rows)
            slot = width + t
            length = min(cache.length, -(-(slot + 1) // self.length_bucket) * self.length_bucket)
            logits = self._decode(cache, tok, positions, slot, length)
            positions = positions + 1
        return out_tokens[:rows].cpu(), out_logps[:rows].cpu(), lengths[:rows].cpu(), stopped[:rows].cpu()

    def _compact(self, cache, live, tok, positions, out_row, rows):
        """Live rows to the front of the cache and of the step's tensors, in the smallest bucket that holds them."""
        k, batch = live.numel(), _bucket(live.numel())
        cache.select_rows(live)
        pad = batch - k
        tok = torch.cat([tok[live], tok.new_zeros(pad)])
        positions = torch.cat([positions[live], positions.new_zeros(pad)])
        out_row = torch.cat([out_row[live], out_row.new_full((pad,), rows)])
        return tok, positions, out_row, out_row == rows

    def _decode(self, cache, tok, positions, slot: int, length: int) -> torch.Tensor:
        slot_t = torch.tensor([slot], device=tok.device)
        if not (self.cuda_graphs and tok.is_cuda):
            return self.decoder.decode(cache, tok, positions, slot_t, length)
        key = (tok.shape[0], length, self._module_state())
        if key not in self._graphs:
            self._graphs[key] = self._capture(cache, tok.shape[0], length)
        graph, in_tok, in_pos, in_slot, out = self._graphs[key]
        in_tok.copy_(tok)
        in_pos.copy_(positions)
        in_slot.copy_(slot_t)
        graph.replay()
        return out

    def _capture(self, cache, batch: int, length: int):
        """One decode step of `batch` rows over `length` slots, captured. The warm-up and the capture run on
        a side stream with the inputs of a real step; replaying it right after redoes that step's writes."""
        dev = self.device
        in_tok = torch.zeros(batch, dtype=torch.long, device=dev)
        in_pos = torch.zeros(batch, dtype=torch.long, device=dev)
        in_slot = torch.zeros(1, dtype=torch.long, device=dev)
        step = lambda: self.decoder.decode(cache, in_tok, in_pos, in_slot, length)  # noqa: E731
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = step()
        return graph, in_tok, in_pos, in_slot, out

    def _module_state(self):
        """What a captured graph baked in besides tensors: which adapters were active, or none."""
        peft_config = getattr(self.model, "peft_config", None)
        if peft_config is None:
            return None
        layer = next((m for m in self.model.modules() if hasattr(m, "disable_adapters") and hasattr(m, "lora_A")),
                     None)
        return (tuple(getattr(self.model, "active_adapters", ()) or ()),
                bool(layer.disable_adapters) if layer is not None else None)

    # ------------------------------------------------------------------ HF forward, dynamic cache (other models)

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

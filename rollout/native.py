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

A multi-turn rollout (rollout/environment.py) runs inside `with engine.conversations():`. There a prompt that
extends a conversation the engine generated the previous turn of (its tokens so far, then the environment's
answer) goes on from the KV cache that conversation already has: each row's cached tokens are packed to the
front of the row (a token's K holds its position, rotated in, so its slot does not matter) and only the last
generated token and the answer are prefilled, after the longest row (shorter rows keep a hole that the valid
mask hides; positions count real tokens). It prefills whole conversations instead when the cache is too
short for the turn, when the rollout ran in waves (each wave reuses the cache), and for the dynamic-cache path
and sliding windows.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from transformers import DynamicCache

from rl.logprobs import positions_from_mask
from rollout.decode_state import DecodeState
from rollout.decoder import Decoder
from rollout.engine import Completion, SamplingParams
from rollout.merged import MergedWeights
from rollout.packed4 import PackedNF4Weights
from rollout.sampling import filter_logits, sample_tokens, sample_with_noise  # noqa: F401 (re-exported)

log = logging.getLogger("tandem")


def _stop_ids(model, tokenizer, params: SamplingParams) -> list[int]:
    if params.stop_token_ids is not None:
        return list(params.stop_token_ids)
    return eos_token_ids(model, tokenizer)


def eos_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a completion by default: the generation config's and the tokenizer's EOS."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(ids))


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()  # the next power of two


class NativeEngine:
    def __init__(self, model, tokenizer=None, cuda_graphs: bool = True, check_every: int = 8,
                 length_bucket: int = 256, merge_lora: bool | None = None, max_length: int | None = None,
                 read_4bit: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (model.generation_config.pad_token_id or 0)
        self.decoder = Decoder.for_model(model)
        self.cuda_graphs = cuda_graphs
        self.check_every = check_every
        self.length_bucket = length_bucket
        self.merge_lora = merge_lora  # None: when the merged copy takes at most half the free memory
        # the KV cache's length when known up front (prompt + completion tokens): allocated once, and every
        # rollout then has the same shapes whatever came before it (a resumed run computes what the
        # uninterrupted one did, to the bit)
        self.max_length = max_length
        self.state: DecodeState | None = None
        self._graphs: dict = {}
        self._pool = None
        self._stop_tensors: dict[tuple, torch.Tensor] = {}
        # read a 4-bit base's codes at small batches (rollout/packed4.py); off by default until its kernel beats
        # merged bf16 weights (benchmarks/NOTES.md: it is latency-bound at decode shapes for now)
        self._packed_ok = read_4bit
        self._merged_ok = True  # until a build says these layers cannot be merged
        self._said_no_room = False
        # in conversations(): the tokens of the conversation each cache row holds (None: none)
        self._turns: list | None = None
        self.prefilled_tokens = 0  # token positions prefilled, padding included: what continuing saves

    @contextmanager
    def conversations(self):
        """Within it, generate() continues the conversations it generated the last turn of (module docstring)."""
        self._turns = []
        try:
            yield self
        finally:
            self._turns = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_token_ids: list[list[int]], params: SamplingParams,
                 refresh_weights: bool = True) -> list[list[Completion]]:
        """refresh_weights=False: the working weights were prepared for this rollout already (prepare(), as
        the memory scheduler does before running a rollout in waves)."""
        if not prompt_token_ids or any(len(p) == 0 for p in prompt_token_ids):
            raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                if refresh_weights:
                    self.prepare(len(prompt_token_ids) * params.n)
                run = self._generate_static if self.decoder is not None else self._generate
                tokens, logps, lengths, stopped = run(prompt_token_ids, params)
        finally:
            self.model.train(was_training)
        return self._completions(tokens, logps, lengths, stopped, len(prompt_token_ids), params.n)

    # ------------------------------------------------------------------ memory (rollout/scheduler.py)

    def rollout_length(self, prompt_width: int, max_tokens: int) -> int:
        """Positions the KV cache holds for a rollout of prompts `prompt_width` wide."""
        return max(prompt_width + max_tokens, self.max_length or 0) if self.decoder else prompt_width + max_tokens

    def bytes_per_row(self, length: int) -> int:
        """Device memory one row of a rollout takes: its KV cache, its token history, and the vocabulary-wide
        logits, sampling noise and sampling temporaries."""
        cfg = self.model.config
        if self.decoder is not None:
            kv = self.decoder.kv_bytes_per_token()
        else:  # HF's dynamic cache, grown by concatenation: the layer being extended exists twice for a moment
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            element = next(self.model.parameters()).element_size()
            kv = 2 * (cfg.num_hidden_layers + 1) * kv_heads * head_dim * element
        return length * (kv + 8 + 4 + 1) + cfg.vocab_size * 4 * 4

    def held_bytes(self, kv_only: bool = False) -> int:
        """Device memory the engine keeps between rollouts (released by release()): the KV cache and decode
        state, and unless kv_only the merged working weights."""
        held = 0
        if self.state is not None:
            st = self.state
            held += sum(t.nbytes for t in (*st.cache.keys, *st.cache.values, st.cache.valid, st.hist_tok,
                                           st.hist_lp, st.noise))
        if not kv_only and self.decoder is not None and self.decoder.merged is not None:
            held += MergedWeights.nbytes(self.decoder)
        return held

    def prepare(self, rows: int, free_memory=None, reserve: int = 0) -> None:
        """Working weights for a rollout of `rows` rows, made or refreshed from the live adapters. With
        free_memory (a callable: bytes still allowed; the memory scheduler's), merged weights are made only if
        they fit beside `reserve` bytes (the rollout's KV cache)."""
        if self.decoder is not None:
            self._prepare_weights(_bucket(rows), free_memory, reserve)

    def release(self) -> None:
        """Free the KV cache, the decode state, the captured graphs and the merged weights (the next rollout
        makes them again). The packed 4-bit weights stay: their codes are the policy's own weights (views),
        and a rebuild would hold a second copy of them for a moment."""
        self._drop_state()
        if self.decoder is not None:
            self.decoder.merged = None

    def _drop_state(self) -> None:
        self.state, self._graphs, self._pool = None, {}, None

    def _prepare_weights(self, rows: int, free_memory=None, reserve: int = 0) -> None:
        """Working weights for decoding unless merge_lora is False (then the policy's modules): with read_4bit,
        a 4-bit base's codes with the adapters fused (for batches of up to 16 rows), and merged weights when
        they fit in half the free memory, made only once a larger batch needs them; both refreshed from the
        live adapters before every rollout."""
        dec = self.decoder
        if self.merge_lora is False:
            return
        if dec.packed is not None:
            dec.packed.refresh()
        elif self._packed_ok:
            dec.packed = PackedNF4Weights.build(dec)
            self._packed_ok = dec.packed is not None
        if dec.merged is not None:
            dec.merged.refresh()
        elif self._merged_ok and (dec.packed is None or rows > dec.PACKED_MAX_TOKENS):
            dec.merged = self._build_merged(free_memory, reserve)

    def _build_merged(self, free_memory=None, reserve: int = 0) -> MergedWeights | None:
        dec = self.decoder
        need = MergedWeights.nbytes(dec)
        room = free_memory() if free_memory is not None else None
        if room is not None:  # under a memory budget: only beside the rollout's KV cache; asked again next time
            room -= reserve
        elif dec.device.type == "cuda":
            room = torch.cuda.mem_get_info()[0] // 2
        if self.merge_lora is None and room is not None and need > room:  # asked again at the next rollout
            if not self._said_no_room:
                log.info("native engine: no merged weights (they would take %.1f GB); decoding through %s",
                         need / 1e9, "the 4-bit codes" if dec.packed is not None else "the policy's modules")
                self._said_no_room = True
            return None
        merged = MergedWeights.build(dec)
        if merged is None:
            self._merged_ok = False
            log.info("native engine: these layers cannot be merged (DoRA or another activation); decoding "
                     "through the policy's modules")
        return merged

    # ------------------------------------------------------------------ static cache, CUDA graphs

    def _left_padded(self, prompts: list[list[int]]):
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = True
        return ids.to(self.device), mask.to(self.device)

    def _state_for(self, rows: int, length: int, vocab: int) -> DecodeState:
        st = self.state
        fits = st is not None and st.rows >= rows and st.length >= length and st.vocab == vocab
        if not fits or st.cache.keys[0].dtype != self.decoder.dtype:
            self._drop_state()  # captured graphs point into the old buffers
            st = None  # the old buffers are freed before the new ones are allocated
            self.state = st = DecodeState.allocate(self.decoder, rows, length, vocab)
        st.cache.valid.zero_()
        return st

    def _generate_static(self, prompts: list[list[int]], params: SamplingParams):
        dec, n, dev = self.decoder, params.n, self.device
        rows = len(prompts) * n
        batch = _bucket(rows)
        conversing = self._turns is not None and n == 1
        resumed = self._resumable(prompts, params, batch) if conversing else None
        if conversing:
            self._turns = []  # written again at the end: a failed turn leaves nothing to continue
        if resumed is not None:
            st = self.state
            logits, positions, width = self._continue(st, prompts, resumed)
        else:
            ids, mask = self._left_padded(prompts)
            width = ids.shape[1]
            st = self._state_for(batch, max(width + params.max_tokens, self.max_length or 0), dec.vocab_size)
            logits = dec.prefill(st.cache, ids, mask)
            self.prefilled_tokens += ids.numel()
            positions = mask.sum(-1)  # the next token's position in each prompt
        cache = st.cache
        if n > 1:  # the prompt's KV is computed once and copied to its n samples
            for buf in (*cache.keys, *cache.values):
                buf[:rows, :, :width] = buf[:len(prompts), :, :width].repeat_interleave(n, 0)
            cache.valid[:rows, :width] = cache.valid[:len(prompts), :width].repeat_interleave(n, 0)
            logits, positions = logits.repeat_interleave(n, 0), positions.repeat_interleave(n, 0)
        # rows from `rows` up to the bucket are placeholders: finished from the start, flushed to a scratch
        # output row (index `rows`)
        st.start(batch, rows, positions, width, params.max_tokens)
        out_row = torch.cat([torch.arange(rows, device=dev), torch.full((batch - rows,), rows, device=dev)])
        home = torch.arange(st.rows, device=dev)  # conversing: the output row each cache row holds (>= rows: none)
        out = (torch.full((rows + 1, params.max_tokens), self.pad_id, dtype=torch.long, device=dev),
               torch.zeros((rows + 1, params.max_tokens), dtype=torch.float32, device=dev),
               torch.full((rows + 1,), params.max_tokens, dtype=torch.long, device=dev),
               torch.zeros(rows + 1, dtype=torch.bool, device=dev))

        generator = None
        if params.seed is not None and params.temperature > 0:
            generator = torch.Generator(device=dev).manual_seed(params.seed)
        stop_ids = tuple(_stop_ids(self.model, self.tokenizer, params))
        module_state = self._module_state()  # fixed for the rollout: part of every captured graph's key
        if stop_ids not in self._stop_tensors:  # kept: captured graphs read it at its address
            # a flag per vocabulary entry, read at the sampled tokens: torch.isin over a long stop list sorts and
            # makes its values unique, which waits on the host and cannot be captured in a CUDA graph
            is_stop = torch.zeros(dec.vocab_size, dtype=torch.bool, device=dev)
            is_stop[torch.tensor([i for i in stop_ids if 0 <= i < dec.vocab_size], dtype=torch.long, device=dev)] = True
            self._stop_tensors[stop_ids] = is_stop
        stop_t = self._stop_tensors[stop_ids]
        self._draw_noise(st, batch, params, generator)
        logits = torch.cat([logits, logits.new_zeros((batch - rows, logits.shape[1]))])  # placeholder rows
        st.record(logits, batch, params, stop_t, self.pad_id)  # token 0, from the prefill
        for t in range(1, params.max_tokens):
            if t % self.check_every == 0:
                live = (~st.finished[:batch]).nonzero().squeeze(1)  # the one host synchronization, every few steps
                if live.numel() == 0:
                    break
                if live.numel() <= batch // 2:
                    st.flush(batch, out_row, out, params.max_tokens)  # rows about to leave keep their tokens
                    out_row, move = st.compact(live, out_row, rows, keep_rows=conversing)
                    home[:move.numel()] = home[move]
                    batch = out_row.numel()
            slot = width + t - 1  # where token t-1's K and V go
            length = min(st.length, -(-(slot + 1) // self.length_bucket) * self.length_bucket)
            self._draw_noise(st, batch, params, generator)
            self._step(st, batch, length, params, (module_state, stop_ids), stop_t)
        st.flush(batch, out_row, out, params.max_tokens)
        result = tuple(x[:rows].cpu() for x in out)
        if conversing:
            self._keep_turn(st, prompts, result, home, width)
        return result

    def _resumable(self, prompts: list[list[int]], params: SamplingParams, batch: int) -> list[tuple] | None:
        """For each prompt, (the cache row of the conversation it extends, the tokens of it cached); None
        unless every prompt extends one and the cache has room for this turn after the longest row, packed."""
        st, turns = self.state, self._turns
        if st is None or not turns or self.decoder.window is not None or batch > st.rows:
            return None
        rows_of: dict[tuple, list[int]] = {}  # a conversation's tokens -> its rows (G greedy ones may be alike)
        for row, seq in enumerate(turns):
            if seq is not None:
                rows_of.setdefault(tuple(seq), []).append(row)
        lengths = sorted({len(seq) for seq in rows_of}, reverse=True)
        found = []
        for p in prompts:
            match = next((rows_of[key] for k in lengths if k <= len(p) and rows_of.get(key := tuple(p[:k]))), None)
            if match is None:
                return None
            row = match.pop()
            found.append((row, len(turns[row]) - 1))  # its last token's K/V: not written yet
        width = max(len(p) - cached for p, (_, cached) in zip(prompts, found))  # the new tokens, padded
        return found if max(c for _, c in found) + width + params.max_tokens <= st.length else None

    def _continue(self, st: DecodeState, prompts: list[list[int]], found: list[tuple]):
        """The conversations to cache rows 0..P-1 (the prompts' order) and packed, their new tokens prefilled
        after the longest -> (last logits, next positions, first slot after the new tokens)."""
        dev = self.device
        target = torch.tensor([row for row, _ in found], device=dev)
        others = torch.ones(st.rows, dtype=torch.bool, device=dev).index_fill_(0, target, False)
        st.cache.select_rows(torch.cat([target, others.nonzero().squeeze(1)]))  # moved, nothing overwritten
        start = st.cache.pack(len(prompts))
        ids, mask = self._left_padded([p[cached:] for p, (_, cached) in zip(prompts, found)])
        cached = torch.tensor([cached for _, cached in found], device=dev)
        logits = self.decoder.prefill(st.cache, ids, mask, start=start, first_positions=cached)
        self.prefilled_tokens += ids.numel()
        return logits, cached + mask.sum(-1), start + ids.shape[1]

    def _keep_turn(self, st: DecodeState, prompts: list[list[int]], result, home: torch.Tensor, width: int):
        """After a turn: which cache row holds each conversation and its tokens; the slots a row wrote after
        its last kept token (it went on decoding in the batch after it stopped) marked empty."""
        tokens, _, lengths, _ = result
        rows = len(prompts)
        where = torch.empty(rows, dtype=torch.long)
        held = home.cpu()
        for row, o in enumerate(held.tolist()):
            if o < rows:
                where[o] = row
        cut = width + lengths - 1  # the last kept token's slot: its K/V is written with the next turn's tokens
        keep = torch.arange(st.length)[None, :] < cut[:, None]
        index = where.to(self.device)
        st.cache.valid.index_copy_(0, index, st.cache.valid.index_select(0, index) & keep.to(self.device))
        seqs: list[list[int] | None] = [None] * st.rows
        for o, row in enumerate(where.tolist()):
            seqs[row] = prompts[o] + tokens[o, :int(lengths[o])].tolist()
        self._turns = seqs

    def _draw_noise(self, st, batch, params, generator):
        if params.temperature > 0:  # drawn outside the graph: the generator's state advances on the host
            st.noise[:batch].exponential_(generator=generator)

    def _step(self, st, batch: int, length: int, params, baked: tuple, stop_t):
        """Decode one token for rows 0..batch-1 and sample the next: replayed from a CUDA graph on CUDA.
        `baked`: what a graph fixes besides tensors and shapes (the active adapters, the stop ids)."""
        run = lambda: st.advance(self.decoder, batch, length, params, stop_t, self.pad_id)  # noqa: E731
        if not (self.cuda_graphs and st.tok.is_cuda):
            return run()
        key = (batch, length, baked, self.decoder.merged is not None, self.decoder.packed is not None,
               params.temperature, params.top_k, params.top_p)
        graph = self._graphs.get(key)
        if graph is not None:
            graph.replay()
            return
        # first time for this shape: the warm-up run on a side stream is this step, for real; the capture
        # that follows only records (nothing runs), so it is not replayed now
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self._pool):
                run()
        except RuntimeError as e:  # a module that synchronizes with the host cannot be captured
            log.warning("native engine: decode steps cannot be captured in CUDA graphs (%s); running them "
                        "eagerly, which is slower", str(e).splitlines()[0][:200])
            self.cuda_graphs = False
            torch.cuda.synchronize()
            return
        self._graphs[key] = graph

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
        ids, mask = self._left_padded(prompts)
        mask = mask.long()
        positions = positions_from_mask(mask)
        cache = DynamicCache(config=self.model.config)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True, logits_to_keep=1)
        return out.logits[:, -1, :], cache, mask, mask.sum(-1)

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

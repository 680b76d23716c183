"""Everything a decode step reads and writes, in fixed buffers, so that a step can be a CUDA graph.

Rows are batch rows, not output rows: row i of every buffer belongs to the same sequence, and compaction
moves all of them together. The step (`advance`) runs the decoder for the current tokens, samples the next
ones with noise drawn beforehand, and records them in `hist_tok` / `hist_lp` at the step index `t`, which,
like the cache slot, lives on the device: nothing in a step depends on a Python value that changes between
steps, only on the batch size and the attended length, which key the captured graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.decoder import Decoder, KVCache
from rollout.sampling import sample_with_noise


@dataclass
class DecodeState:
    cache: KVCache
    tok: torch.Tensor  # (rows,) the last sampled token of each row, the next step's input
    pos: torch.Tensor  # (rows,) that token's position
    finished: torch.Tensor  # (rows,) bool: sampled a stop token (placeholder rows start finished)
    kept: torch.Tensor  # (rows,) tokens kept: up to and including the stop token
    hist_tok: torch.Tensor  # (rows, length) the sampled tokens, by step
    hist_lp: torch.Tensor  # (rows, length) their log-probabilities
    noise: torch.Tensor  # (rows, vocab) Exp(1) noise for the next sampling
    slot: torch.Tensor  # (1,) cache slot of the current tokens' K and V
    t: torch.Tensor  # (1,) index of the token being sampled

    @classmethod
    def allocate(cls, decoder: Decoder, rows: int, length: int, vocab: int) -> DecodeState:
        dev = decoder.device
        longs = lambda *shape: torch.zeros(shape, dtype=torch.long, device=dev)  # noqa: E731
        return cls(decoder.new_cache(rows, length), longs(rows), longs(rows),
                   torch.zeros(rows, dtype=torch.bool, device=dev), longs(rows), longs(rows, length),
                   torch.zeros((rows, length), dtype=torch.float32, device=dev),
                   torch.zeros((rows, vocab), dtype=torch.float32, device=dev), longs(1), longs(1))

    @property
    def rows(self) -> int:
        return self.tok.shape[0]

    @property
    def length(self) -> int:
        return self.cache.length

    @property
    def vocab(self) -> int:
        return self.noise.shape[1]

    def start(self, batch: int, rows: int, positions: torch.Tensor, width: int, max_tokens: int) -> None:
        """Rows 0..rows-1 real, rows..batch-1 placeholders; token 0 is sampled next, its K/V go to `width`."""
        self.pos[:rows] = positions
        self.pos[rows:batch] = 0
        self.finished[:batch] = torch.arange(batch, device=self.tok.device) >= rows
        self.kept[:batch] = max_tokens
        self.hist_tok[:batch] = 0
        self.hist_lp[:batch] = 0
        self.slot.fill_(width)
        self.t.fill_(0)

    def record(self, logits, batch: int, params, is_stop: torch.Tensor, pad_id: int) -> None:
        """Sample token t of rows 0..batch-1 from their logits and write it down. is_stop: (vocab,) bool."""
        tok, lp = sample_with_noise(logits, params, self.noise[:batch] if params.temperature > 0 else None)
        finished = self.finished[:batch]
        newly = ~finished & is_stop[tok]
        column = self.t.expand(batch)[:, None]
        self.hist_tok[:batch].scatter_(1, column, torch.where(finished, pad_id, tok)[:, None])
        self.hist_lp[:batch].scatter_(1, column, torch.where(finished, 0.0, lp)[:, None])
        self.kept[:batch] = torch.where(newly, self.t + 1, self.kept[:batch])
        finished |= newly
        self.tok[:batch] = tok

    def advance(self, decoder: Decoder, batch: int, length: int, params, is_stop, pad_id: int) -> None:
        """One step: K/V of the current tokens into the cache, logits, then token t+1 sampled and recorded."""
        logits = decoder.decode(self.cache, self.tok[:batch], self.pos[:batch], self.slot, length)
        self.pos[:batch] += 1
        self.slot += 1
        self.t += 1
        self.record(logits, batch, params, is_stop, pad_id)

    def flush(self, batch: int, out_row: torch.Tensor, out, max_tokens: int) -> None:
        """Copy rows 0..batch-1 to their output rows (placeholders all go to one scratch row)."""
        tokens, logps, lengths, stopped = out
        tokens[out_row] = self.hist_tok[:batch, :max_tokens]
        logps[out_row] = self.hist_lp[:batch, :max_tokens]
        lengths[out_row] = self.kept[:batch]
        stopped[out_row] = self.finished[:batch]

    def compact(self, live: torch.Tensor, out_row: torch.Tensor, scratch: int, keep_rows: bool = False):
        """Live rows to the front of every buffer, placeholders after them up to the next power of two;
        -> (the new output row of each batch row, the move: old row of each new row 0..m-1). keep_rows: the
        finished rows are moved behind the live ones, not overwritten (their KV cache is kept for a next turn)."""
        k, old = live.numel(), out_row.numel()
        batch = 1 << max(0, k - 1).bit_length()
        move = live
        if keep_rows:
            finished = torch.ones(old, dtype=torch.bool, device=live.device).index_fill_(0, live, False)
            move = torch.cat([live, finished.nonzero().squeeze(1)])
        self.cache.select_rows(move)
        for buf in (self.tok, self.pos, self.finished, self.kept, self.hist_tok, self.hist_lp):
            buf[:move.numel()] = buf.index_select(0, move)
        self.finished[k:batch] = True
        return torch.cat([out_row[live], out_row.new_full((batch - k,), scratch)]), move

"""Text generation: KV-cached decoding, streaming with stop strings, batches, chat prompts.

The decoding loop, per batch of prompts (token id lists):

    prefill   one ``model.forward_cached`` over the left-padded prompts (all positions)
    decode    sample a token per row (see :mod:`.sampling`), feed it back, one per step
              through the fixed-shape :class:`DecodeStep` (its position is a tensor)
    stop      per row, on the first of:
                "eos"             the model wrote <|eos|>
                "end"             the model wrote <|end|> (end of the assistant turn) or
                                  another built-in control token (<|user|>, <|bos|>, ...)
                "stop_string"     the text contains a user stop string (cut before it)
                "max_new_tokens"  config.max_new_tokens tokens were generated
                "context"         the model has read max_seq_len tokens: there is no room
                                  to feed the last token back, so generation STOPS (it does
                                  not slide the window). A prompt of P <= max_seq_len tokens
                                  therefore gets at most max_seq_len - P + 1 new tokens.
                "interrupted"     the caller stopped iterating (e.g. Ctrl-C)
    A prompt longer than max_seq_len keeps its most recent max_seq_len tokens; the result
    says so (``prompt_truncated`` = tokens dropped, plus a line in ``warnings``).

``use_cache=False`` recomputes the whole sequence every step instead (same tokens, for
tests and the benchmark). Finished rows leave the batch (their cache rows are dropped), so
in a batch every row gets exactly the tokens it would get alone (greedy).

Streaming text (:mod:`.text_stream`): a character split across tokens appears once
complete, and a stop string never reaches the output, even split across several tokens.
Prompts (:mod:`.chat_prompt`): a plain-text continuation, or a chat history cut to fit.

    >>> cfg = SamplingConfig(temperature=0, max_new_tokens=20, stop=("User:",))
    >>> result = generate(model, tokenizer, [tokenizer.bos_id, *tokenizer.encode("Hi")], cfg)
    >>> result.text, result.stop_reason, result.new_tokens                  # doctest: +SKIP
    (' there', 'stop_string', 4)
    >>> for piece in stream(model, tokenizer, ids, cfg): print(piece.text, end="")  # +SKIP
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from ..errors import SettingError
from ..model.decode_step import DecodeStep
from ..model.kv_cache import KVCache, left_pad
from .decode_row import DecodeRow, GenerationResult, Piece, StopRules, default_stop_ids
from .sampling import SamplingConfig, make_generator, sample_next

__all__ = ["STOP_REASONS", "Stream", "generate", "generate_batch", "stream"]

STOP_REASONS = ("eos", "end", "stop_string", "max_new_tokens", "context", "interrupted")


def _prepare(
    model, prompts: Sequence[Sequence[int]], config: SamplingConfig, tokenizer, keep_logits
) -> list[DecodeRow]:
    if not isinstance(config, SamplingConfig):
        raise TypeError(f"config must be a SamplingConfig, got {type(config).__name__}")
    if config.stop and tokenizer is None:
        raise SettingError("stop strings need a tokenizer to decode the text")
    max_len = model.config.max_seq_len
    vocab = model.config.vocab_size
    rows = []
    for prompt in prompts:
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SettingError("prompt is empty: give at least one token (e.g. <|bos|>)")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise SettingError(f"prompt token id {bad[0]} outside the vocabulary [0, {vocab})")
        dropped = max(0, len(prompt) - max_len)
        row = DecodeRow(prompt[dropped:], config, tokenizer, keep_logits)
        if dropped:
            row.result.prompt_truncated = dropped
            row.result.warnings.append(
                f"prompt of {len(prompt)} tokens is longer than the context ({max_len}); "
                f"kept the last {max_len} tokens"
            )
        rows.append(row)
    return rows


def _decode(
    model,
    rows: list[DecodeRow],
    config: SamplingConfig,
    use_cache: bool,
    stop_ids: dict[int, str],
    t0: float,
    step: DecodeStep | None = None,
) -> Iterator[list[tuple[int, Piece]]]:
    """Core loop over the unfinished rows; yields [(row index, piece)] once per step.

    With the KV cache, the only host sync of a step is reading the sampled ids back
    (``tolist``); everything else is queued on the device.
    """
    rules = StopRules(stop_ids, config.max_new_tokens, model.config.max_seq_len)
    batch = _Batch(model, rows, config, use_cache, step)
    generator = None if config.greedy else make_generator(config.seed, batch.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            logits = batch.prefill()
            n_new = 0
            while True:
                next_ids = sample_next(logits, config, generator, batch.seen, batch.counts)
                n_new += 1
                tokens = next_ids.tolist()
                events, keep = _take_tokens(rows, batch.active, tokens, logits, n_new, t0, rules)
                yield events
                if not keep:
                    return
                logits = batch.feed(batch.keep_only(keep, next_ids))
    finally:
        if was_training:
            model.train()


def _take_tokens(
    rows: list[DecodeRow],
    active: list[int],
    tokens: list[int],
    logits: torch.Tensor,
    n_new: int,
    t0: float,
    rules: StopRules,
) -> tuple[list[tuple[int, Piece]], list[int]]:
    """Give every active row its sampled token; return the step's [(row index, piece)]
    and the batch positions of the rows that go on."""
    now = time.perf_counter()
    events = []
    keep = []
    for j, (i, tok) in enumerate(zip(active, tokens, strict=True)):
        row = rows[i]
        if n_new == 1:
            row.result.time_to_first_token_s = now - t0
        if row.result.step_logits is not None:
            row.result.step_logits.append(logits[j].float().cpu())
        text, finished = row.accept(tok, n_new, rules)
        if not finished:
            keep.append(j)
        events.append((i, Piece(tok, text)))
    return events, keep


class _Batch:
    """The device tensors of the rows still generating, in batch order: ids, pad flags,
    penalty state and KV cache. Finished rows leave the batch."""

    def __init__(self, model, rows: list[DecodeRow], config: SamplingConfig, use_cache: bool,
                 step: DecodeStep | None):  # fmt: skip
        self.model = model
        self.device = device = model.device
        self.active = list(range(len(rows)))  # row indices still generating, in batch order
        ids, pad = left_pad([r.prompt for r in rows], pad_id=0)  # pad slots are masked out
        self.ids, self.pad = ids.to(device), pad.to(device)
        vocab = model.config.vocab_size
        # seen [B, V]: tokens of prompt + answer (repetition penalty); counts [B, V]:
        # occurrences in the answer (frequency / presence). None when the penalty is off.
        self.seen = self.counts = None
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
            for i, r in enumerate(rows):  # the prompt's own tokens (not the pad slots)
                self.seen[i, torch.tensor(r.prompt, device=device)] = True
        if config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
            self.counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
        self.step = self.cache = None
        if use_cache:
            # Slots for the prompt (pads included) and every new token, not the whole context:
            # an imported model may allow 131072 positions that one answer never reaches.
            need = ids.shape[1] + config.max_new_tokens
            need = min(need, model.config.max_seq_len + int(pad.max()))
            if step is None or step.max_rows < len(rows) or step.cache.max_len < need:
                step = DecodeStep(model, model.new_cache(len(rows), max_len=need))
            # The prefill writes rows 0..B-1 of the step's preallocated cache; decode steps
            # then write one slot per row in place (finished rows are compacted, not copied).
            full = step.cache
            self.cache = KVCache(
                k=[t[: len(rows)] for t in full.k], v=[t[: len(rows)] for t in full.v], pad=self.pad
            )
            self.step = step
            self.slots = torch.full((len(rows),), ids.shape[1], dtype=torch.long, device=device)

    def prefill(self) -> torch.Tensor:
        """Logits [B, V] for the first new token of every row."""
        if self.cache is not None:
            return self.model.forward_cached(self.ids, self.cache, last_only=True)[:, -1]
        return _full_forward(self.model, self.ids, self.pad)

    def keep_only(self, keep: list[int], next_ids: torch.Tensor) -> torch.Tensor:
        """Keep the rows at batch positions ``keep``; return their ``next_ids``."""
        if len(keep) == len(self.active):
            return next_ids
        sel = torch.tensor(keep, device=self.device)
        self.active = [self.active[j] for j in keep]
        self.ids, self.pad = self.ids[sel], self.pad[sel]
        if self.seen is not None:
            self.seen = self.seen[sel]
        if self.counts is not None:
            self.counts = self.counts[sel]
        if self.cache is not None:
            for j, src in enumerate(keep):  # keep is increasing: a source is never overwritten
                if src != j:
                    self.cache.move_row(src, j, self.cache.pos)
            self.slots = self.slots[sel]
        return next_ids[sel]

    def feed(self, next_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row (ids [B]); return the logits [B, V] for the next one."""
        col = next_ids[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, col, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, col, torch.ones_like(col, dtype=self.counts.dtype))
        if self.cache is not None:
            pos = self.cache.pos
            logits = self.step(next_ids, self.slots, self.pad, window=pos + 1)
            self.cache.pos = pos + 1
            self.slots += 1
            return logits
        self.ids = torch.cat([self.ids, col], dim=1)
        return _full_forward(self.model, self.ids, self.pad)


def _full_forward(model, ids: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """Last-position logits from the whole sequence (no cache)."""
    if ids.shape[0] == 1 and int(pad[0]) == 0:
        return model(ids)[:, -1]
    return model(ids, pad=pad)[:, -1]


def _finalize(rows: list[DecodeRow], t0: float) -> None:
    end = time.perf_counter()
    for row in rows:
        if not row.done:
            row.finish("interrupted")
        res = row.result
        res.new_tokens = len(res.token_ids)
        res.elapsed_s = end - t0
        res.tokens_per_s = res.new_tokens / res.elapsed_s if res.elapsed_s > 0 else 0.0
        decode_s = res.elapsed_s - res.time_to_first_token_s
        if res.new_tokens > 1 and decode_s > 0:
            res.decode_tokens_per_s = (res.new_tokens - 1) / decode_s


class Stream:
    """Iterator of :class:`Piece` for one prompt; ``result`` is complete once it ends.

    Stopping early (``close()``, ``break`` then ``close()``, or an exception such as
    KeyboardInterrupt raised while iterating) finishes the result with stop reason
    "interrupted" and the text released so far.
    """

    def __init__(self, rows: list[DecodeRow], loop: Iterator[list[tuple[int, Piece]]], t0: float):
        self._rows = rows
        self._loop = loop
        self._t0 = t0
        self._buffer: list[Piece] = []
        self._closed = False

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> Piece:
        while not self._buffer:
            if self._closed:
                raise StopIteration
            try:
                events = next(self._loop)
            except StopIteration:
                self._finish()
                raise
            except BaseException:
                self.close()
                raise
            self._buffer.extend(p for _, p in events)
        return self._buffer.pop(0)

    def close(self) -> None:
        """Stop generating now (idempotent)."""
        if not self._closed:
            self._loop.close()
            self._finish()

    def _finish(self) -> None:
        if not self._closed:
            self._closed = True
            _finalize(self._rows, self._t0)

    @property
    def result(self) -> GenerationResult:
        """The result (call after the iteration ended or close())."""
        if not self._closed:
            raise RuntimeError("the stream is still running: iterate to the end or close()")
        return self._rows[0].result


def stream(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    keep_logits: bool = False,
    decoder: DecodeStep | None = None,
) -> Stream:
    """Generate from one prompt, yielding a :class:`Piece` per token as it is produced.

    ``tokenizer`` may be None for token-only generation (no text, no stop strings).
    ``stop_token_ids`` replaces the default stop tokens (<|end|>, <|eos|>). ``decoder``: a
    :class:`DecodeStep` (compiled or CUDA-graphed, with its preallocated cache) to reuse
    across calls; by default an eager one is built for this call's cache.
    """
    config = SamplingConfig() if config is None else config
    t0 = time.perf_counter()
    rows = _prepare(model, [prompt_ids], config, tokenizer, keep_logits)
    stop_ids = default_stop_ids(tokenizer, stop_token_ids)
    return Stream(rows, _decode(model, rows, config, use_cache, stop_ids, t0, decoder), t0)


def generate(
    model,
    tokenizer,
    prompt_ids: Sequence[int],
    config: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    keep_logits: bool = False,
    decoder: DecodeStep | None = None,
) -> GenerationResult:
    """Generate from one prompt and return the text with counts, timings and stop reason."""
    s = stream(
        model,
        tokenizer,
        prompt_ids,
        config,
        use_cache=use_cache,
        stop_token_ids=stop_token_ids,
        keep_logits=keep_logits,
        decoder=decoder,
    )
    for _ in s:
        pass
    return s.result


def generate_batch(
    model,
    tokenizer,
    prompts: Sequence[Sequence[int]],
    config: SamplingConfig | None = None,
    *,
    use_cache: bool = True,
    stop_token_ids: Sequence[int] | None = None,
    keep_logits: bool = False,
    decoder: DecodeStep | None = None,
) -> list[GenerationResult]:
    """Generate from several prompts of any lengths at once (left-padded into one batch).

    Greedy results equal those of :func:`generate` on each prompt alone. With sampling the
    rows share one seeded generator, so they differ from single-prompt runs (but a batch
    run is reproducible with the same seed). Timings are those of the whole batch.
    """
    config = SamplingConfig() if config is None else config
    if len(prompts) == 0:
        raise ValueError("generate_batch needs at least one prompt")
    t0 = time.perf_counter()
    rows = _prepare(model, prompts, config, tokenizer, keep_logits)
    stop_ids = default_stop_ids(tokenizer, stop_token_ids)
    loop = _decode(model, rows, config, use_cache, stop_ids, t0, decoder)
    try:
        for _ in loop:
            pass
    finally:
        loop.close()
        _finalize(rows, t0)
    return [r.result for r in rows]

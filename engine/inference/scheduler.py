"""Continuous batching: one thread owns the model and serves many requests at once.

Every step (one loop of :meth:`Scheduler._step`):

    leave    rows whose request finished or was cancelled leave the batch; the last live
             row moves into the freed slot, so live rows stay 0..n-1 (a per-row KV view)
    join     waiting requests take free rows: each prompt is prefilled into its row
             (slots 0..P-1 = positions 0..P-1) and its first token is sampled
    decode   one fixed-shape step over all live rows, each at its own slot
             (:class:`DecodeStep`), then one token per row with that request's own
             sampling settings and seeded generator

A request therefore never waits for the batch to drain, and a cancelled one (a client
that went away) gives its row back at the next step boundary. Requests beyond the free
rows wait in a bounded queue; when it is full :meth:`submit` raises :class:`QueueFull`.
The stop rules, UTF-8 safe text and stop strings are those of :mod:`.generate`.
Requests joining in one step with the same prompt (the ``n`` answers of one request,
:meth:`Scheduler.submit_many`) share one prefill: the row is copied. A row may ask for
log-probabilities (:class:`.row_options.RowOptions`), delivered with its events. With a
:class:`.prefix_cache.PrefixCache`, a prompt that starts with tokens whose K/V a row left
there (its prompt when it joined, prompt and answer when it left) copies them into its row
and prefills only the rest.

    >>> sched = Scheduler(model, tokenizer, max_batch=8, max_queue=32).start()
    >>> handle = sched.submit(prompt_ids, SamplingConfig(temperature=0))   # doctest: +SKIP
    >>> for event in handle: print(event.text, end="")                     # doctest: +SKIP
    >>> sched.stop()
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..model.cuda_graphs import make_decode_step
from .decode_row import DecodeRow, GenerationResult, StopRules, default_stop_ids
from .grammar import RowGrammar
from .logprobs import TokenLogprob, prompt_logprobs, step_logprobs
from .prefix_cache import PrefixCache
from .row_options import RowOptions
from .sampling import SamplingConfig, make_generator, sample_next

__all__ = ["Event", "Handle", "QueueFull", "Scheduler", "finish_reason"]


class QueueFull(RuntimeError):
    """Every row is busy and the waiting queue is full: try again later."""

    def __init__(self, retry_after_s: int):
        super().__init__(f"the server is busy; retry in {retry_after_s} s")
        self.retry_after_s = retry_after_s


def finish_reason(stop_reason: str) -> str:
    """The OpenAI name of a :mod:`.generate` stop reason: "stop" or "length"."""
    return "length" if stop_reason in ("max_new_tokens", "context") else "stop"


@dataclass
class Event:
    """What a request produced in one step: released text, and at the end its result
    (``done``), or an ``error`` message when the engine failed on it."""

    text: str = ""
    n_tokens: int = 0
    done: bool = False
    result: GenerationResult | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # this step's token, when asked for
    prompt_logprobs: list[TokenLogprob] | None = None  # first event only, when asked for


class Handle:
    """The caller's side of one request: iterate its events (blocking), or pass ``notify``
    to :meth:`Scheduler.submit` to be called (from the scheduler thread) with each one."""

    def __init__(self, request_id: str, notify: Callable[[Event], None] | None):
        self.id = request_id
        self.cancelled = False
        self.submitted = time.perf_counter()
        self._queue: queue.Queue[Event] | None = queue.Queue() if notify is None else None
        self._notify = notify if notify is not None else self._queue.put

    def cancel(self) -> None:
        """Give the row back at the next step (idempotent; no more events after that)."""
        self.cancelled = True

    def delivered(self) -> list[Event]:
        """The events delivered and not yet taken, without waiting: for a caller that steps
        the scheduler itself (tests, benchmarks) instead of running its thread."""
        if self._queue is None:
            raise RuntimeError("this handle delivers its events to its notify callback")
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    def __iter__(self) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this handle delivers its events to its notify callback")
        while True:
            event = self._queue.get()
            yield event
            if event.done:
                return


class _Live:
    """A request that holds a row: its decoding state, sampling state and last token."""

    def __init__(self, handle: Handle, prompt: list[int], config: SamplingConfig, sched,
                 options: RowOptions | None = None):  # fmt: skip
        self.handle = handle
        self.config = config
        self.options = options or RowOptions()
        self.prompt_lp: list[TokenLogprob] | None = None  # sent with the first event
        vocab = sched.model.config.vocab_size
        grammar = self.options.grammar
        self.grammar = RowGrammar(grammar, vocab) if grammar is not None else None
        self.row = DecodeRow(prompt, config, sched.tokenizer, keep_logits=False)
        self.rules = StopRules(sched.stop_ids, config.max_new_tokens, sched.max_seq_len)
        self.length = 0  # filled KV slots (host int: no device read per step)
        self.n_new = 0
        self.next_id: torch.Tensor | None = None  # [1] last sampled token, not yet fed
        dev = sched.device
        self.generator = None if config.greedy else make_generator(config.seed, dev)
        vocab = sched.model.config.vocab_size
        self.seen = self.counts = None  # penalty state [1, V], only when a penalty is on
        if config.repetition_penalty != 1.0:
            self.seen = torch.zeros(1, vocab, dtype=torch.bool, device=dev)
            self.seen[0, torch.tensor(prompt, device=dev)] = True
        if config.frequency_penalty != 0.0 or config.presence_penalty != 0.0:
            self.counts = torch.zeros(1, vocab, dtype=torch.float32, device=dev)

    @property
    def plain_greedy(self) -> bool:
        """Greedy without penalties: the whole group is one argmax."""
        return (self.config.greedy and self.seen is None and self.counts is None
                and self.grammar is None)  # fmt: skip

    def note(self, token: torch.Tensor) -> None:
        """Record the sampled token [1] in the penalty state."""
        col = token[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, col, True)
        if self.counts is not None:
            self.counts.scatter_add_(1, col, torch.ones_like(col, dtype=torch.float32))


class Scheduler:
    """Owns the model, its KV cache of ``max_batch`` rows, and the waiting queue.

    ``on_done(handle, result)`` is called (scheduler thread) once per finished request,
    e.g. to write a log line. ``decode``: "eager", "compile" or "graphs" (CUDA graphs per
    batch bucket; a failed capture calls ``on_fallback`` with one line and goes on eagerly).
    All public methods are thread-safe.
    """

    def __init__(self, model, tokenizer, max_batch: int = 16, max_queue: int = 64,
                 on_done: Callable[[Handle, GenerationResult], None] | None = None,
                 prefix_cache: PrefixCache | None = None,
                 decode: str = "eager",
                 on_fallback: Callable[[str], None] | None = None):  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise ValueError(
                f"need max_batch >= 1 and max_queue >= 0, got {max_batch}, {max_queue}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_seq_len = model.config.max_seq_len
        self.device = model.device
        self.stop_ids = default_stop_ids(tokenizer, None)
        self.on_done = on_done
        self.prefix_cache = prefix_cache
        self.cache = model.new_cache(max_batch, max_len=self.max_seq_len)
        self.prefilled_prompts = 0  # prompts run through the model (equal ones count once)
        # fixed shapes over that cache: eager, compiled or CUDA graphs (see make_decode_step)
        self.decode_step = make_decode_step(model, self.cache, decode, on_fallback)
        self._live: list[_Live] = []  # row i of the cache belongs to _live[i]
        self._waiting: deque[tuple[Handle, list[int], SamplingConfig, RowOptions]] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.steps = 0  # decode steps run (tests watch step boundaries with it)
        self._decode_s = 0.0  # recent seconds per step, for Retry-After

    # -- the caller's side ---------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Finish the loop; requests still running end with stop reason "interrupted"."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def submit(self, prompt: list[int], config: SamplingConfig,
               notify: Callable[[Event], None] | None = None,
               request_id: str | None = None,
               options: RowOptions | None = None) -> Handle:  # fmt: skip
        """Queue a prompt (validated token ids, at most max_seq_len of them)."""
        return self.submit_many([(prompt, config, notify, request_id, options)])[0]

    def submit_many(self, requests: list[tuple]) -> list[Handle]:
        """Queue several (prompt, config, notify, request_id, options) at once: all or
        none (QueueFull), next to each other, so free rows take them in the same step and
        equal prompts share their prefill."""
        for prompt, *_ in requests:
            if not 0 < len(prompt) <= self.max_seq_len:
                raise ValueError(
                    f"prompt must have 1..{self.max_seq_len} tokens, got {len(prompt)}"
                )
        with self._cond:
            # Free rows take requests at the next step; beyond them, max_queue may wait.
            room = self.max_queue + max(0, self.max_batch - len(self._live))
            if len(self._waiting) + len(requests) > room:
                raise QueueFull(self._retry_after())
            handles = []
            for prompt, config, notify, request_id, options in requests:
                handle = Handle(request_id or f"req-{next(self._ids)}", notify)
                self._waiting.append((handle, list(prompt), config, options or RowOptions()))
                handles.append(handle)
            self._cond.notify_all()
        return handles

    def load(self) -> dict[str, int]:
        """Live rows and waiting requests right now (for /health and the tests)."""
        with self._cond:
            return {"active": len(self._live), "waiting": len(self._waiting),
                    "max_batch": self.max_batch, "max_queue": self.max_queue}  # fmt: skip

    def _retry_after(self) -> int:
        # Roughly when a row may free up: one typical answer's worth of decode steps.
        return max(1, round(self._decode_s * 64))

    # -- the scheduler thread ------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self._live and not self._waiting:
                    self._cond.wait()
                if self._stopping:
                    break
            self.step()
        for live in self._live:
            self._finish(live, "interrupted")
        self._live.clear()
        while self._waiting:
            handle, prompt, config, options = self._waiting.popleft()
            self._finish(_Live(handle, prompt, config, self, options), "interrupted")

    @torch.inference_mode()
    def step(self) -> None:
        """One step: leave, join, decode (see the module docstring). The engine thread
        calls it; tests may call it directly on a scheduler that was never started."""
        self._leave()
        self._join()
        if self._live:
            t0 = time.perf_counter()
            try:
                self._decode()
            except Exception as e:  # the model failed: fail the batch, keep serving
                for live in self._live:
                    self._fail(live, str(e))
                self._live.clear()
            self._decode_s = 0.9 * self._decode_s + 0.1 * (time.perf_counter() - t0)
            self.steps += 1

    def _leave(self) -> None:
        """Drop finished and cancelled rows; move the last live row into each gap."""
        i = 0
        while i < len(self._live):
            live = self._live[i]
            if not (live.row.done or live.handle.cancelled):
                i += 1
                continue
            if not live.row.done:  # cancelled: the client is gone
                self._finish(live, "interrupted")
            self._remember(i, live)
            last = len(self._live) - 1
            if i != last:
                self.cache.move_row(last, i, self._live[last].length)
            self._live[i] = self._live[last]
            self._live.pop()

    def _join(self) -> None:
        """Prefill waiting requests into the free rows (one batched forward) and sample
        their first tokens."""
        joining = []
        with self._cond:
            while self._waiting and len(self._live) + len(joining) < self.max_batch:
                handle, prompt, config, options = self._waiting.popleft()
                joining.append(_Live(handle, prompt, config, self, options))
        for live in [x for x in joining if x.handle.cancelled]:
            self._finish(live, "interrupted")
        joining = [x for x in joining if not x.handle.cancelled]
        if not joining:
            return
        # Equal prompts are prefilled once: the first of each comes first, copies after.
        seen: set[tuple[int, ...]] = set()
        uniques, copies = [], []
        for x in joining:
            key = tuple(x.row.prompt)
            (copies if key in seen else uniques).append(x)
            seen.add(key)
        base = len(self._live)
        try:
            uniques, logits = self._prefill_uniques(base, uniques)
            joining = uniques + copies
            first_of = {tuple(x.row.prompt): j for j, x in enumerate(uniques)}
            src = [first_of[tuple(x.row.prompt)] for x in joining]
            for j in range(len(uniques), len(joining)):
                self.cache.move_row(base + src[j], base + j, len(joining[j].row.prompt))
            logits = logits[torch.tensor(src, device=logits.device)]
            self._score_prompts(joining)
        except Exception as e:
            for live in joining:
                self._fail(live, str(e))
            return
        for j, live in enumerate(joining):
            live.length = len(live.row.prompt)
            if j < len(uniques):  # a prompt now in the cache helps requests that come later
                self._remember(base + j, live)
        self._live.extend(joining)
        self._take(joining, logits)

    def _prefill_uniques(self, base: int, uniques: list[_Live]) -> tuple[list, torch.Tensor]:
        """Prefill distinct prompts into rows base, base+1, ...: those without a cached
        prefix in one batched forward, then each with one from where its prefix ends.
        Returns the rows' order (fresh first) and their last logits [k, V]."""
        pc = self.prefix_cache
        found = [pc.lookup(x.row.prompt) if pc is not None else None for x in uniques]
        fresh = [x for x, m in zip(uniques, found, strict=True) if m is None]
        hits = [(x, m) for x, m in zip(uniques, found, strict=True) if m is not None]
        parts = [self._prefill(base, [x.row.prompt for x in fresh])] if fresh else []
        for j, (x, match) in enumerate(hits, start=base + len(fresh)):
            parts.append(self._prefill_after(j, x.row.prompt, match))
        return fresh + [x for x, _ in hits], torch.cat(parts)

    def _prefill_after(self, row: int, prompt: list[int], match) -> torch.Tensor:
        """Copy a cached prefix's K/V into ``row``, run the rest of the prompt; last logits."""
        m = match.length
        for dst, src in zip((*self.cache.k, *self.cache.v), (*match.k, *match.v), strict=True):
            dst[row, :, :m] = src[:, :m]
        view = self.cache.rows(row, 1)
        view.pos = m  # the prefix's slots are filled: the rest of the prompt goes after
        idx = torch.tensor([prompt[m:]], dtype=torch.long, device=self.device)
        return self.model.forward_cached(idx, view, last_only=True)[:, -1]

    def _remember(self, row: int, live: _Live) -> None:
        """Offer the tokens whose K/V fill this row (prompt and fed answer) to the
        prefix cache, before the row is reused."""
        if self.prefix_cache is None or live.length == 0:
            return
        fed = live.row.prompt + live.row.result.token_ids[: live.length - len(live.row.prompt)]
        self.prefix_cache.store(fed, [t[row] for t in self.cache.k],
                                [t[row] for t in self.cache.v])  # fmt: skip

    def _score_prompts(self, joining: list[_Live]) -> None:
        """The prompt log-probabilities of rows that asked for them (echo), once per prompt."""
        done: dict[tuple[tuple[int, ...], int], list[TokenLogprob]] = {}
        for x in joining:
            if x.options.prompt_logprobs:
                key = (tuple(x.row.prompt), x.options.top)
                if key not in done:
                    done[key] = prompt_logprobs(self.model, x.row.prompt, x.options.top)
                x.prompt_lp = done[key]

    def _prefill(self, first: int, prompts: list[list[int]]) -> torch.Tensor:
        """Run the prompts into cache rows first, first+1, ... (slot = position, RIGHT-padded
        so every prompt starts at slot 0; the pad slots are overwritten by later tokens and
        masked until then). Return each prompt's last-position logits [k, V]."""
        k, width = len(prompts), max(len(p) for p in prompts)
        self.prefilled_prompts += k
        view = self.cache.rows(first, k)
        idx = torch.tensor([p + [0] * (width - len(p)) for p in prompts], dtype=torch.long)
        last = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
        logits = self.model.forward_cached(idx.to(self.device), view, at=last.to(self.device))
        return logits[:, -1]

    def _decode(self) -> None:
        """Feed every live row's last token; sample the next one for each."""
        live = [x for x in self._live if not (x.row.done or x.handle.cancelled)]
        if len(live) != len(self._live):
            self._leave()  # a row finished at its first token or was cancelled meanwhile
            live = self._live
        if not live:
            return
        lengths = [x.length for x in live]  # row b writes slot lengths[b] (= its position)
        if max(lengths) >= self.max_seq_len:
            raise ValueError(f"a row reached max_seq_len {self.max_seq_len}")
        ids = torch.cat([x.next_id for x in live])  # [n]
        slots = torch.tensor(lengths, dtype=torch.long).to(self.device)
        logits = self.decode_step(ids, slots, torch.zeros_like(slots), window=max(lengths) + 1)
        for x in live:
            x.length += 1
        self._take(live, logits)

    def _take(self, live: list[_Live], logits: torch.Tensor) -> None:
        """Sample one token per row (rows [i] of logits), hand out the events."""
        # Greedy rows without penalties take one argmax together; the others sample alone
        # (each with its own settings and seeded generator).
        tokens = logits.argmax(dim=-1)
        for j, x in enumerate(live):
            if not x.plain_greedy:
                row = logits[j : j + 1]
                if x.grammar is not None:  # only tokens that continue valid output
                    row = x.grammar.mask(row)
                picked = sample_next(row, x.config, x.generator, x.seen, x.counts)
                tokens[j] = picked[0]
        lps = self._logprobs(live, logits, tokens)
        host = tokens.tolist()  # the step's one host sync: the text needs the ids
        now = time.perf_counter()
        for j, x in enumerate(live):
            x.n_new += 1
            x.next_id = tokens[j : j + 1]
            x.note(x.next_id)
            if x.n_new == 1:
                x.row.result.time_to_first_token_s = now - x.handle.submitted
            if x.grammar is not None:
                try:
                    x.grammar.accept(host[j])
                except RuntimeError as e:
                    self._fail(x, str(e))
                    continue
            text, finished = x.row.accept(host[j], x.n_new, x.rules)
            event = Event(text=text, n_tokens=1, logprobs=lps.get(j))
            if x.prompt_lp is not None:
                event.prompt_logprobs, x.prompt_lp = x.prompt_lp, None
            if finished:
                self._complete(x, event)
            elif not x.handle.cancelled:
                x.handle._notify(event)

    @staticmethod
    def _logprobs(live: list[_Live], logits, tokens) -> dict[int, list[TokenLogprob]]:
        """Row index -> [its token's log-probability entry], for the rows that asked."""
        rows = [j for j, x in enumerate(live) if x.options.logprobs is not None]
        if not rows:
            return {}
        at = torch.tensor(rows, device=logits.device)
        tops = [live[j].options.top for j in rows]
        return {j: [e] for j, e in zip(rows, step_logprobs(logits[at], tokens[at], tops),
                                        strict=True)}  # fmt: skip

    # -- endings -------------------------------------------------------------------------

    def _complete(self, live: _Live, event: Event) -> None:
        res = live.row.result
        res.new_tokens = len(res.token_ids)
        res.elapsed_s = time.perf_counter() - live.handle.submitted
        res.tokens_per_s = res.new_tokens / res.elapsed_s if res.elapsed_s > 0 else 0.0
        decode_s = res.elapsed_s - res.time_to_first_token_s
        if res.new_tokens > 1 and decode_s > 0:
            res.decode_tokens_per_s = (res.new_tokens - 1) / decode_s
        if self.on_done is not None:
            self.on_done(live.handle, res)
        event.done, event.result = True, res
        live.handle._notify(event)

    def _finish(self, live: _Live, reason: str) -> None:
        """End a request that did not stop by itself (cancelled, or the server stopping)."""
        if not live.row.done:
            self._complete(live, Event(text=live.row.finish(reason), n_tokens=0))

    def _fail(self, live: _Live, message: str) -> None:
        live.row.done = True
        live.handle._notify(Event(done=True, error=message, result=live.row.result))

"""
Sampling from a GPT with a KV cache: per-row settings, reproducible per-row randomness, and traces.

One call generates K rows from one prompt: the prompt is prefilled once (batch 1), its KV cache is
copied to K rows and all rows decode together. Every row has its own `SamplingSettings`
(temperature, top-k, top-p, min-p, seed), and its own `torch.Generator`, from which it draws exactly
one uniform number per step whatever happens (greedy, forced or sampled). So a row's tokens never
depend on its batch neighbours: K settings batched give, token for token, what each gives alone.
Rows stop at `<|assistant_end|>` / `<|bos|>` (when the tokenizer has them) or at `max_tokens`;
a finished row leaves the batch and its KV cache rows are dropped.

The sampled distribution of a row, in this order (the same in every function here):
  1. temperature: logits / T (T = 0 means greedy: the argmax, the lowest id among tied logits);
  2. top-k: keep exactly k tokens; among tokens tied at the k-th logit, the lower ids are kept;
  3. top-p: sort the renormalised survivors by probability (ties: lower id first) and keep the
     shortest prefix whose mass reaches top_p, including the token that crosses the threshold;
  4. min-p: keep tokens whose probability is at least min_p x that of the most likely token.
All of it runs in float64 log-space with the maximum subtracted before exp, so temperatures like
1e-4 cannot overflow. A row's token is the inverse CDF (in token-id order) of its uniform draw.

An optional trace records per step and row: the chosen token, its probability under the model
(temperature 1, unfiltered) and under the distribution actually sampled from, its rank, the top-N
alternatives by model probability with both probabilities and whether each survived the filters,
the full-vocabulary entropy in nats, and the rank and probability of watched token ids. It is
computed for all rows at once with tensor ops and turned into Python objects only when read.

The request and result types (`SamplingSettings`, `TraceOptions`, `SamplingError`, `RowResult`,
`StepTrace`, `Alternative`, `WatchedToken`) live in the torch-free `sampling.py`, so the app can build
and read them without torch; they are re-exported here.

The tool loop (`tools=True`, as upstream's engine always does; ../shared/docs/UPSTREAM_OUTPUTS.md §7):
a row that emits `<|python_start|>` (sampled or forced) collects the tokens that follow; on
`<|python_end|>` they are decoded and passed to `calculator.use_calculator`, and when it gives a
result the row's next steps emit `<|output_start|>`, the result's tokens and `<|output_end|>` in
place of sampled ones (one per step, counting toward max_tokens; the step's draw is still consumed).
Those steps are traced as forced and as `tool_output`. The calculator is the only thing that runs.

This module knows nothing about files, command lines or display: see `checkpoint_manager.py` to
load a model and `tools/generation_explorer.py` for the command-line explorer.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F

from nanochat.calculator import use_calculator
from nanochat.sampling import (
    FINISH_LENGTH,
    FINISH_STOP,
    MAX_SEED,
    Alternative,
    RowResult,
    SamplingError,
    SamplingSettings,
    StepTrace,
    TraceOptions,
    WatchedToken,
)

STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TOOL_TOKENS = ("<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
__all__ = ["Engine", "StepEvent", "ToolLoop", "ResultBuilder", "SettingsBatch", "filtered_weights", "sampling_distribution", "sample",
           "trace_tensors", "materialise_traces", "STOP_TOKENS",
           # re-exported from sampling.py (the torch-free types)
           "FINISH_LENGTH", "FINISH_STOP", "MAX_SEED", "Alternative", "RowResult", "SamplingError", "SamplingSettings",
           "StepTrace", "TraceOptions", "WatchedToken"]


# ---------------------------------------------------------------------- the sampling math (pure)


class SettingsBatch:
    """Per-row settings as tensors, plus Python flags that let a step skip filters no row uses.

    Skipping a filter never changes a row's result (a switched-off filter keeps every token), which
    is what keeps rows independent of their batch neighbours.
    """

    def __init__(self, settings: Sequence[SamplingSettings], vocab_size: int, device="cpu"):
        self.settings = [s.validate() for s in settings]
        self.vocab_size = vocab_size
        f64 = dict(dtype=torch.float64, device=device)
        rows = self.settings
        self.greedy = torch.tensor([s.greedy for s in rows], dtype=torch.bool, device=device)
        # Greedy rows divide by 1: their weights only feed the (unused) sampling branch.
        self.temperature = torch.tensor([s.temperature if not s.greedy else 1.0 for s in rows], **f64)
        self.log_min_p = torch.tensor([math.log(s.min_p) if s.min_p > 0 else -math.inf for s in rows], **f64)
        self.any_greedy = any(s.greedy for s in rows)
        self.any_sampled = not all(s.greedy for s in rows)
        self.any_min_p = any(s.min_p > 0 for s in rows)
        # Top-k and top-p run only on the sampled rows that use them (topk() cost grows with rows).
        k_rows = [i for i, s in enumerate(rows) if s.top_k and s.top_k < vocab_size and not s.greedy]
        self.max_k = max((rows[i].top_k for i in k_rows), default=0)
        self.top_k_rows = self._subset(k_rows, device)
        self.top_k_sub = torch.tensor([rows[i].top_k for i in k_rows], dtype=torch.long, device=device)
        p_rows = [i for i, s in enumerate(rows) if s.top_p < 1 and not s.greedy]
        self.any_top_p = bool(p_rows)
        self.top_p_rows = self._subset(p_rows, device)
        self.top_p_sub = torch.tensor([rows[i].top_p for i in p_rows], **f64)

    def _subset(self, rows: list[int], device) -> torch.Tensor | None:
        return None if len(rows) == len(self.settings) else torch.tensor(rows, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return len(self.settings)

    def select(self, rows: list[int]) -> SettingsBatch:
        return SettingsBatch([self.settings[i] for i in rows], self.vocab_size, self.greedy.device)


def _top_k_mask(scaled: torch.Tensor, k: torch.Tensor, max_k: int) -> torch.Tensor:
    """Exactly k tokens per row; among tokens tied at the k-th value the lower ids are kept."""
    kth = scaled.topk(max_k, dim=-1).values.gather(1, (k - 1)[:, None])
    above = scaled > kth
    tied = scaled == kth
    room = k[:, None] - above.sum(-1, keepdim=True)
    return above | (tied & (tied.cumsum(-1) <= room))


def _top_p_mask(weights: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most probable tokens until their mass reaches top_p, the crossing token included;
    tokens of equal weight count in id order (lower first).

    No full sort (slow on CPU): topk of a growing head finds the crossing weight w_c, then a token
    is kept if heavier than w_c, or tied with it and the mass before it (all heavier tokens plus
    the lower-id ties) is still below the target.
    """
    target = top_p[:, None] * weights.sum(-1, keepdim=True)
    vocab = weights.size(-1)
    m = min(64, vocab)
    while True:
        head = weights.topk(m, dim=-1).values
        cum = head.cumsum(-1)
        if m == vocab or bool((cum[:, -1:] >= target).all()):
            break
        m = min(4 * m, vocab)
    crossing = (cum < target).sum(-1, keepdim=True).clamp_(max=m - 1)
    w_c = head.gather(1, crossing)
    heavier = weights > w_c
    tied = weights == w_c
    before = (weights * heavier).sum(-1, keepdim=True) + (tied.cumsum(-1) - 1) * w_c
    return heavier | (tied & (before < target))


def _rows_mask(fn, x: torch.Tensor, rows: torch.Tensor | None, *args) -> torch.Tensor:
    """fn's mask on the given rows only (all rows when None); the other rows keep every token."""
    if rows is None:
        return fn(x, *args)
    out = torch.ones_like(x, dtype=torch.bool)
    return out.index_copy_(0, rows, fn(x.index_select(0, rows), *args))


def _filter(x: torch.Tensor, batch: SettingsBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    scaled = x / batch.temperature[:, None]
    weights = torch.softmax(scaled, dim=-1)  # subtracts the maximum before exp: no overflow
    keep = None
    if batch.max_k:
        keep = _rows_mask(_top_k_mask, scaled, batch.top_k_rows, batch.top_k_sub, batch.max_k)
    if batch.any_top_p:
        m = _rows_mask(_top_p_mask, weights if keep is None else weights * keep, batch.top_p_rows, batch.top_p_sub)
        keep = m if keep is None else keep & m
    if batch.any_min_p:  # p >= min_p * p_max, compared in log space so no product can underflow
        m = weights.log() >= batch.log_min_p[:, None] + weights.max(-1, keepdim=True).values.log()
        keep = m if keep is None else keep & m
    if keep is not None:
        weights = weights * keep
    return weights, keep


def filtered_weights(logits: torch.Tensor, batch: SettingsBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 weights (R, V) of each row's sampled distribution (the tempered softmax with filtered
    tokens zeroed, not renormalised), and the kept-token mask (None when no row filters). Greedy
    rows get temperature-1 weights here; see `sample`."""
    return _filter(logits.double(), batch)


def sampling_distribution(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """The float64 probabilities (V,) that `settings` samples from given logits (V,): one-hot on
    the argmax for temperature 0."""
    logits = logits.reshape(1, -1)
    if settings.validate().greedy:
        return F.one_hot(logits.argmax(-1), logits.size(-1)).double()[0]
    weights, _ = filtered_weights(logits, SettingsBatch([settings], logits.size(-1), logits.device))
    return (weights / weights.sum(-1, keepdim=True))[0]


def _inverse_cdf(weights: torch.Tensor, one_minus_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (R,) and total weights (R, 1). 1 - u lies in (0, 1], so the target is positive and at
    most the total: the token found always has positive weight."""
    cum = weights.cumsum(-1)
    total = cum[:, -1:]
    return torch.searchsorted(cum, one_minus_u[:, None] * total).view(-1), total


def sample(logits: torch.Tensor, batch: SettingsBatch, uniforms: torch.Tensor) -> torch.Tensor:
    """One token per row (R,) from logits (R, V), each row by inverse CDF (in token-id order) of its
    uniform in [0, 1); greedy rows take the argmax (the first maximum: lowest id among ties)."""
    x = logits.double()
    tokens = None
    if batch.any_sampled:
        tokens, _ = _inverse_cdf(_filter(x, batch)[0], 1.0 - uniforms.double())
    if batch.any_greedy:
        best = x.argmax(-1)
        tokens = best if tokens is None else torch.where(batch.greedy, best, tokens)
    return tokens


# ---------------------------------------------------------------------- traces


def trace_tensors(x: torch.Tensor, tokens: torch.Tensor, batch: SettingsBatch, best, weights, keep, total,
                  options: TraceOptions, watch_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """One step's trace for all rows at once, from float64 logits x (R, V). Columns of the gathered
    tensors: the chosen token, then the top-N alternatives, then the watched ids (see StepTrace).
    About a dozen tensor ops whatever R and N are: one softmax, one topk, one gather per quantity."""
    rows, vocab = x.shape
    p = torch.softmax(x, -1)
    n = min(options.top_n, vocab)
    cols = [tokens[:, None]]
    if n:
        cols.append(x.topk(n, dim=-1).indices)
    if options.watch:
        if watch_ids is None:
            watch_ids = torch.tensor(options.watch, device=x.device)
        cols.append(watch_ids.expand(rows, -1))
    idx = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
    logit = x.gather(1, idx)
    if weights is not None:
        sampled = weights.gather(1, idx) / total
        kept = keep.gather(1, idx) if keep is not None else torch.ones_like(idx, dtype=torch.bool)
    else:
        sampled, kept = torch.zeros_like(logit), torch.zeros_like(idx, dtype=torch.bool)
    if batch.any_greedy:  # a greedy row samples from the one-hot on its argmax
        onehot = idx == best[:, None]
        sampled = torch.where(batch.greedy[:, None], onehot.double(), sampled)
        kept = torch.where(batch.greedy[:, None], onehot, kept)
    out = {"idx": idx, "model_prob": p.gather(1, idx), "sampled_prob": sampled, "kept": kept,
           "rank": (x > logit[:, :1]).sum(-1), "entropy": torch.special.entr(p).sum(-1)}
    if options.watch:
        w = len(options.watch)
        out["watch_rank"] = (x[:, None, :] > logit[:, -w:, None]).sum(-1)
    return out


_TRACE_FIELDS = ("idx", "model_prob", "sampled_prob", "kept", "rank", "entropy", "watch_rank")


def materialise_traces(steps: list[tuple[int, list[int], torch.Tensor | None, tuple[bool, ...] | None, dict]],
                       options: TraceOptions) -> list[StepTrace]:
    """StepTraces from recorded steps [(step, tokens, forced mask or None, tool-output flags or None,
    trace tensors)], in order, with one .tolist() per field for all steps together (the only per-token
    Python work)."""
    if not steps:
        return []
    cols = {k: torch.cat([s[4][k] for s in steps]).tolist() for k in _TRACE_FIELDS if k in steps[0][4]}
    forced = [f for _, tokens, mask, _, _ in steps for f in (mask.tolist() if mask is not None else [False] * len(tokens))]
    tool = [f for _, tokens, _, flags, _ in steps for f in (flags if flags is not None else [False] * len(tokens))]
    n_alt = len(cols["idx"][0]) - 1 - len(options.watch)
    out, i = [], 0
    for step, tokens, _, _, _ in steps:
        for tok in tokens:
            ids, p, q, kept = cols["idx"][i], cols["model_prob"][i], cols["sampled_prob"][i], cols["kept"][i]
            alts = tuple(Alternative(ids[j], p[j], q[j], kept[j]) for j in range(1, 1 + n_alt))
            watched = tuple(WatchedToken(ids[j], r + 1, p[j]) for j, r in
                            zip(range(1 + n_alt, len(ids)), cols["watch_rank"][i])) if options.watch else ()
            out.append(StepTrace(step, tok, p[0], q[0], cols["rank"][i] + 1, bool(forced[i]), cols["entropy"][i],
                                 alts, watched, tool[i]))
            i += 1
    return out


# ---------------------------------------------------------------------- the engine


class StepEvent:
    """One decoding step: the rows still running, the token each produced, and which finished.

    `trace(row)` builds that row's StepTrace on first use (None without trace options)."""

    __slots__ = ("step", "rows", "tokens", "finished", "tool_output", "_forced", "_trace", "_options", "_built")

    def __init__(self, step, rows, tokens, finished, forced, trace, options, tool_output=None):
        self.step: int = step
        self.rows: tuple[int, ...] = rows  # original row indices, in batch order
        self.tokens: tuple[int, ...] = tokens  # the token of each row in `rows`
        self.finished: dict[int, str] = finished  # row -> finish reason, for rows that ended here
        self.tool_output: tuple[bool, ...] | None = tool_output  # per row in `rows`: emitted by the tool loop
        self._forced, self._trace, self._options, self._built = forced, trace, options, None

    def trace(self, row: int) -> StepTrace | None:
        if self._trace is None:
            return None
        if self._built is None:
            self._built = materialise_traces([self._record()], self._options)
        return self._built[self.rows.index(row)]

    def _record(self):
        return (self.step, list(self.tokens), self._forced, self.tool_output, self._trace)


class ToolLoop:
    """Upstream's per-row tool state (`RowState` in its engine.py): inside a python block the row's
    tokens are collected; its `<|python_end|>` evaluates them with the calculator and queues the
    output block, which the following steps emit. Plain Python on the token ids each step already
    brings to the host; rows that never open a block cost one set lookup per token."""

    def __init__(self, tokenizer, rows: int):
        ids = [tokenizer.special_id(name) for name in TOOL_TOKENS]
        if any(i is None for i in ids):
            raise SamplingError("the tool loop needs a chat tokenizer (it has no <|python_start|> ... <|output_end|>)")
        self.python_start, self.python_end, self.output_start, self.output_end = ids
        self.tokenizer = tokenizer
        self.in_block = [False] * rows
        self.expr: list[list[int]] = [[] for _ in range(rows)]
        self.queue: list[deque[int]] = [deque() for _ in range(rows)]
        self.pending = 0  # rows with queued tokens: when 0, a step needs no forced column from here

    def heads(self, rows: Sequence[int]) -> list[int]:
        """The next queued token of each row (-1: none), in batch order."""
        return [q[0] if (q := self.queue[r]) else -1 for r in rows]

    def advance(self, rows: Sequence[int], tokens: Sequence[int]) -> tuple[bool, ...]:
        """Feed each row's emitted token; per row, whether it was the head of its queue (a tool output)."""
        out = []
        for r, tok in zip(rows, tokens):
            q = self.queue[r]
            from_tool = bool(q) and q[0] == tok
            if q:  # the queued token was due at this step (an explicit forced token may have replaced it)
                q.popleft()
                if not q:
                    self.pending -= 1
            out.append(from_tool)
            if tok == self.python_start:
                self.in_block[r], self.expr[r] = True, []
            elif tok == self.python_end and self.in_block[r]:
                self.in_block[r] = False
                if self.expr[r]:
                    self._call(r, self.tokenizer.decode(self.expr[r]))
                self.expr[r] = []
            elif self.in_block[r]:
                self.expr[r].append(tok)
        return tuple(out)

    def _call(self, row: int, expr: str) -> None:
        result = use_calculator(expr)
        if result is None:  # refused or failed: upstream injects nothing
            return
        if not self.queue[row]:
            self.pending += 1
        self.queue[row].extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])


class ResultBuilder:
    """Collects a stream's StepEvents into one RowResult per row (what `Engine.generate` returns); a
    caller that shows tokens as they come (the app's chat, the explorer's chat) feeds it too."""

    def __init__(self, engine: Engine, rows: Sequence[SamplingSettings], trace: TraceOptions | None):
        self.engine, self.rows, self.options = engine, list(rows), trace
        self.tokens: list[list[int]] = [[] for _ in self.rows]
        self.reasons: list[str] = [FINISH_LENGTH] * len(self.rows)
        self.records: list = []

    def add(self, ev: StepEvent) -> None:
        for r, t in zip(ev.rows, ev.tokens):
            self.tokens[r].append(t)
        for r, why in ev.finished.items():
            self.reasons[r] = why
        if self.options is not None:
            self.records.append((ev.rows, ev._record()))

    def text(self, row: int = 0) -> str:
        """The row's text so far (a final stop token left out)."""
        ids = self.tokens[row]
        return self.engine.decode(ids[:-1] if self.reasons[row] == FINISH_STOP else ids)

    def text_deltas(self, events: Iterable[StepEvent], row: int = 0) -> Iterator[str]:
        """Add every event, yielding the row's new text as it grows (what a chat shows while the reply
        is generated). Text ending inside a multi-byte character (decoded as U+FFFD) waits for the
        token that completes it."""
        shown = ""
        for ev in events:
            self.add(ev)
            if row not in ev.rows:
                continue
            text = self.text(row)
            if text.endswith("\ufffd") and row not in ev.finished:
                continue
            if len(text) > len(shown) and text.startswith(shown):
                yield text[len(shown):]
                shown = text

    def results(self) -> list[RowResult]:
        traces: list[list[StepTrace]] = [[] for _ in self.rows]
        if self.options is not None:
            it = iter(materialise_traces([rec for _, rec in self.records], self.options))
            for row_ids, _ in self.records:
                for r in row_ids:
                    traces[r].append(next(it))
        return [RowResult(r, s, tuple(self.tokens[r]), self.text(r), self.reasons[r],
                          tuple(traces[r]) if self.options is not None else None) for r, s in enumerate(self.rows)]


class Engine:
    """Generates from one prompt with K rows of settings. The model must be in eval mode."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer
        self.vocab_size: int = model.config.vocab_size
        self.context: int = model.config.sequence_len
        self.max_positions: int = model.max_positions
        self.device = model.cos.device
        self.default_stop_ids = tuple(i for i in (tokenizer.special_id(n) for n in STOP_TOKENS) if i is not None)

    # -------------------------------------------------------------- prompts

    def encode(self, text: str, chat: bool = False) -> list[int]:
        """Prompt ids for text: <|bos|> + text, or a user turn primed for the assistant when chat."""
        if not isinstance(text, str) or not text:
            raise SamplingError("the prompt is empty")
        if chat:
            return self.render_chat([{"role": "user", "content": text}])
        return self.tokenizer.encode(text, prepend=self.tokenizer.get_bos_token_id())

    def render_chat(self, messages: list[dict]) -> list[int]:
        """Conversation ids (<|bos|>, turns, then <|assistant_start|>) via the tokenizer."""
        try:
            return self.tokenizer.render_chat_prompt(messages)
        except ValueError as e:  # TokenizerError: an ill-formed conversation
            raise SamplingError(f"chat prompt: {e}") from None

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids))

    # -------------------------------------------------------------- generation

    def stream(self, prompt_ids: Sequence[int], settings: SamplingSettings | Sequence[SamplingSettings],
               max_tokens: int, *, trace: TraceOptions | None = None,
               forced: Mapping[int, Mapping[int, int]] | None = None,
               stop_ids: Iterable[int] | None = None, tools: bool = False) -> Iterator[StepEvent]:
        """Validate, then return an iterator of one StepEvent per decoding step.

        settings: one per row (a single SamplingSettings means one row). forced: {row: {step: token}}
        makes that row emit `token` at `step` instead of sampling (its random draw is still consumed,
        so forcing the tokens a run chose reproduces it, and a branch differs only by its choice);
        a forced token also wins over a tool output due at that step (the rest of the output follows).
        stop_ids: tokens that end a row (default: <|assistant_end|> and <|bos|>; () for none).
        tools: run the tool loop (see the module docstring); needs a chat tokenizer.
        """
        rows = [settings] if isinstance(settings, SamplingSettings) else list(settings)
        prompt, batch, forced_ids, stops = self._validate(prompt_ids, rows, max_tokens, trace, forced, stop_ids)
        tool = ToolLoop(self.tokenizer, len(rows)) if tools else None
        return self._run(prompt, batch, max_tokens, trace, forced_ids, stops, tool)

    def generate(self, prompt_ids: Sequence[int], settings: SamplingSettings | Sequence[SamplingSettings],
                 max_tokens: int, *, trace: TraceOptions | None = None,
                 forced: Mapping[int, Mapping[int, int]] | None = None,
                 stop_ids: Iterable[int] | None = None, tools: bool = False) -> list[RowResult]:
        """Run `stream` to the end and return one RowResult per row, in row order."""
        rows = [settings] if isinstance(settings, SamplingSettings) else list(settings)
        builder = ResultBuilder(self, rows, trace)
        for ev in self.stream(prompt_ids, rows, max_tokens, trace=trace, forced=forced, stop_ids=stop_ids, tools=tools):
            builder.add(ev)
        return builder.results()

    def _validate(self, prompt_ids, rows, max_tokens, trace, forced, stop_ids):
        if not rows:
            raise SamplingError("no sampling settings given (need at least one row)")
        try:
            prompt = [int(i) for i in prompt_ids]
        except (TypeError, ValueError):
            raise SamplingError("prompt ids must be integers") from None
        if not prompt:
            raise SamplingError("the prompt is empty")
        if len(prompt) > self.context:
            raise SamplingError(f"the prompt has {len(prompt)} tokens, more than the model's context of {self.context}")
        self._check_ids(prompt, "prompt token id")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise SamplingError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if len(prompt) + max_tokens > self.max_positions:
            raise SamplingError(f"prompt ({len(prompt)}) + max_tokens ({max_tokens}) exceeds the model's "
                                f"{self.max_positions} positions")
        for i, s in enumerate(rows):
            if not isinstance(s, SamplingSettings):
                raise SamplingError(f"row {i}: settings must be SamplingSettings, got {type(s).__name__}")
        batch = SettingsBatch(rows, self.vocab_size, self.device)
        if trace is not None:
            if isinstance(trace.top_n, bool) or not isinstance(trace.top_n, int) or trace.top_n < 0:
                raise SamplingError(f"trace top_n must be an integer >= 0, got {trace.top_n!r}")
            self._check_ids(list(trace.watch), "watched token id")
        forced_ids = None
        if forced:
            forced_ids = torch.full((len(rows), max_tokens), -1, dtype=torch.long)
            for r, by_step in forced.items():
                if not isinstance(r, int) or not 0 <= r < len(rows):
                    raise SamplingError(f"forced tokens for row {r!r}, but there are {len(rows)} rows")
                for step, tok in by_step.items():
                    if not isinstance(step, int) or not 0 <= step < max_tokens:
                        raise SamplingError(f"forced token at step {step!r} is outside 0..{max_tokens - 1}")
                    self._check_ids([tok], "forced token id")
                    forced_ids[r, step] = tok
            forced_ids = forced_ids.to(self.device)
        stops = self.default_stop_ids if stop_ids is None else tuple(stop_ids)
        self._check_ids(list(stops), "stop token id")
        return prompt, batch, forced_ids, frozenset(stops)

    def _check_ids(self, ids: list, what: str) -> None:
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise SamplingError(f"{what} {i!r} is outside the vocabulary (0..{self.vocab_size - 1})")

    def _targets(self, batch: SettingsBatch, max_tokens: int) -> torch.Tensor:
        """(max_tokens, R): 1 - u for each step and row. One generator per row and one draw per step,
        drawn up front: the i-th draw of a seed is the same whatever max_tokens is, so a longer run
        extends a shorter one."""
        draws = []
        for s in batch.settings:
            gen = torch.Generator(device="cpu").manual_seed(s.seed)
            draws.append(torch.rand(max_tokens, generator=gen, dtype=torch.float64))
        return (1.0 - torch.stack(draws, dim=1)).to(self.device)

    def _run(self, prompt, batch: SettingsBatch, max_tokens, options, forced_ids, stops,
             tool: ToolLoop | None = None) -> Iterator[StepEvent]:
        targets = self._targets(batch, max_tokens)
        watch_ids = torch.tensor(options.watch, device=self.device) if options is not None and options.watch else None
        logits, cache = self._prefill(prompt, len(batch), max_tokens)
        active = list(range(len(batch)))
        tokens = None
        for step in range(max_tokens):
            forced_now = None if forced_ids is None else forced_ids[:, step]
            if tool is not None and tool.pending:  # tool outputs are due: they fill the steps not forced explicitly
                due = torch.tensor(tool.heads(active), dtype=torch.long, device=self.device)
                forced_now = due if forced_now is None else torch.where(forced_now >= 0, forced_now, due)
            tokens, forced_mask, trace = self._step(tokens, logits, cache, batch, targets[step], forced_now, options,
                                                    watch_ids)
            logits = None
            token_list = tokens.tolist()
            tool_output = tool.advance(active, token_list) if tool is not None else None
            last = step == max_tokens - 1
            finished = {r: (FINISH_STOP if t in stops else FINISH_LENGTH)
                        for r, t in zip(active, token_list) if last or t in stops}
            yield StepEvent(step, tuple(active), tuple(token_list), finished, forced_mask, trace, options, tool_output)
            if last:
                return
            if finished:
                keep = [i for i, r in enumerate(active) if r not in finished]
                if not keep:
                    return
                index = torch.tensor(keep, device=self.device)
                cache.select(index)
                tokens = tokens.index_select(0, index)
                targets = targets.index_select(1, index)
                forced_ids = None if forced_ids is None else forced_ids.index_select(0, index)
                batch = batch.select(keep)
                active = [active[i] for i in keep]

    @torch.inference_mode()
    def _prefill(self, prompt: list[int], rows: int, max_tokens: int):
        one = self.model.new_kv_cache(1, len(prompt))
        logits = self.model(torch.tensor([prompt], dtype=torch.long, device=self.device), kv_cache=one)[:, -1]
        return logits.expand(rows, -1).contiguous(), one.expand(rows, len(prompt) + max_tokens)

    @torch.inference_mode()
    def _step(self, previous, logits, cache, batch: SettingsBatch, targets, forced, options, watch_ids):
        """Feed the previous tokens (unless logits are given: the prefill's), then choose one token
        per row. One inference-mode entry per step; no host sync except the caller's .tolist()."""
        if logits is None:
            logits = self.model(previous[:, None], kv_cache=cache)[:, -1]
        x = logits.double()
        weights = keep = total = best = tokens = None
        if batch.any_sampled:
            weights, keep = _filter(x, batch)
            tokens, total = _inverse_cdf(weights, targets)
        if batch.any_greedy:
            best = x.argmax(-1)  # the first maximum: lowest id among ties
            tokens = best if tokens is None else torch.where(batch.greedy, best, tokens)
        forced_now = None
        if forced is not None:
            forced_now = forced >= 0
            tokens = torch.where(forced_now, forced, tokens)
        trace = None
        if options is not None:
            trace = trace_tensors(x, tokens, batch, best, weights, keep, total, options, watch_ids)
        return tokens, forced_now, trace

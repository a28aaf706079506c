"""
Generations as plain data for the Generate and Compare pages: an engine row (`nanochat.sampling.RowResult`:
tokens, per-step probabilities, alternatives, entropy) with the text of each of its tokens, tables for
the charts, text statistics, and the probability-shaded HTML of a text.

Pure and torch-free: the result and settings types come from `nanochat.sampling` (the engine's own,
without torch), so nothing here restates them. Sampling happens in `data.py` (through the engine);
drawing in `charts.py`.
"""

from __future__ import annotations

import html
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from nanochat.sampling import FINISH_STOP, RowResult, SamplingSettings, StepTrace

VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"})
REPEAT_N = 3  # repeated n-grams are counted over token trigrams


def visible(text: str) -> str:
    """Whitespace made visible: · space, ↵ newline, ⇥ tab, ␍ carriage return."""
    return text.translate(VISIBLE)


@dataclass(frozen=True)
class Generation:
    """One traced engine row as the pages show it: the row itself plus the text of every token in it."""

    result: RowResult  # with its trace (one StepTrace per generated token)
    texts: Mapping[int, str]  # token id -> its decoded text, for every token and alternative in the trace
    prompt_tokens: int = 0
    forced: tuple[tuple[int, int], ...] = ()  # (step, token id) the engine was told to emit

    @property
    def settings(self) -> SamplingSettings:
        return self.result.settings

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.result.token_ids

    @property
    def text(self) -> str:
        return self.result.text

    @property
    def finish_reason(self) -> str:
        return self.result.finish_reason

    @property
    def steps(self) -> tuple[StepTrace, ...]:
        return self.result.trace or ()

    @property
    def label(self) -> str:
        return settings_label(self.settings)

    def token_text(self, token_id: int) -> str:
        return self.texts.get(token_id, f"<{token_id}>")


@dataclass(frozen=True)
class ChatReply:
    """One generated assistant turn of the Chat page: its traced Generation and its content as the
    conversation holds it (a string, or a list of {"type", "text"} parts when it called the tool)."""

    generation: Generation
    content: str | list[dict]

    @property
    def tool_calls(self) -> int:
        return 0 if isinstance(self.content, str) else sum(p["type"] == "python" for p in self.content)


def settings_label(s: SamplingSettings) -> str:
    text = f"T={s.temperature:g} · top-k {s.top_k or 'off'} · top-p {s.top_p:g}"
    if s.min_p:
        text += f" · min-p {s.min_p:g}"
    return f"{text} · seed {s.seed}"


def from_row(row: RowResult, token_text: Callable[[int], str], forced: Iterable[tuple[int, int]] = (),
             prompt_tokens: int = 0) -> Generation:
    """A Generation from an engine RowResult (traced or not): token_text decodes each id it holds once."""
    ids = set(row.token_ids)
    for t in row.trace or ():
        ids.update(a.token_id for a in t.alternatives)
        ids.update(w.token_id for w in t.watched)
    return Generation(row, {i: token_text(i) for i in sorted(ids)}, prompt_tokens, tuple(forced))


# ---------------------------------------------------------------------- tables for the charts


def alternatives_frame(gen: Generation, n_alternatives: int, first: int = 0, last: int | None = None) -> pd.DataFrame:
    """One row per chart cell: for every step in [first, last), the sampled token (row "sampled") and
    its top-n alternatives by model probability (rows "#1".."#n"). Steps are 1-based in the frame."""
    rows = []
    for st in gen.steps[first:last]:
        rows.append({"step": st.step + 1, "row": "sampled", "order": 0, "token": visible(gen.token_text(st.token_id)),
                     "token_id": st.token_id,
                     "model_prob": st.model_prob, "sampled_prob": st.sampled_prob, "kept": True, "is_sampled": True,
                     "forced": st.forced, "rank": st.rank})
        for i, a in enumerate(st.alternatives[:n_alternatives], 1):
            rows.append({"step": st.step + 1, "row": f"#{i}", "order": i, "token": visible(gen.token_text(a.token_id)),
                         "token_id": a.token_id,
                         "model_prob": a.model_prob, "sampled_prob": a.sampled_prob, "kept": a.kept,
                         "is_sampled": a.token_id == st.token_id, "forced": st.forced and a.token_id == st.token_id,
                         "rank": i})
    cols = ["step", "row", "order", "token", "token_id", "model_prob", "sampled_prob", "kept", "is_sampled", "forced", "rank"]
    return pd.DataFrame(rows, columns=cols)


def steps_frame(gen: Generation) -> pd.DataFrame:
    """Per generated step: token, probabilities, rank and entropy (nats and bits)."""
    rows = [{"step": s.step + 1, "token": visible(gen.token_text(s.token_id)), "token_id": s.token_id, "model_prob": s.model_prob,
             "sampled_prob": s.sampled_prob, "rank": s.rank, "forced": s.forced, "entropy": s.entropy,
             "entropy_bits": s.entropy / math.log(2)} for s in gen.steps]
    return pd.DataFrame(rows, columns=["step", "token", "token_id", "model_prob", "sampled_prob", "rank", "forced",
                                       "entropy", "entropy_bits"])


def distribution_frame(gen: Generation, step: int) -> pd.DataFrame:
    """The traced top-N at one 0-based step, twice per token: model and sampling probability."""
    st = gen.steps[step]
    rows = []
    for i, a in enumerate(st.alternatives, 1):
        label = f"{i}. {visible(gen.token_text(a.token_id))}"
        for which, p in (("model (T=1, unfiltered)", a.model_prob), ("sampling (after filters)", a.sampled_prob)):
            rows.append({"rank": i, "token": label, "token_id": a.token_id, "distribution": which, "prob": p,
                         "kept": a.kept, "is_sampled": a.token_id == st.token_id})
    return pd.DataFrame(rows, columns=["rank", "token", "token_id", "distribution", "prob", "kept", "is_sampled"])


# ---------------------------------------------------------------------- statistics


def distinct_n(tokens: Sequence[int], n: int = 2) -> float | None:
    """Distinct n-grams / all n-grams of a token sequence (None when shorter than n)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngrams(tokens: Sequence[int], n: int = REPEAT_N) -> int:
    """How many n-gram occurrences repeat an earlier one (0 = no n-gram appears twice)."""
    counts = Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))
    return sum(c - 1 for c in counts.values() if c > 1)


def stats(gen: Generation) -> dict:
    """mean log-probability (nats/token, under the model), mean entropy (nats), distinct-2 and repeated
    trigrams, over the generated tokens (a final stop token included: the model chose it)."""
    probs = [s.model_prob for s in gen.steps]
    logps = [math.log(p) if p > 0 else -math.inf for p in probs]
    ents = [s.entropy for s in gen.steps]
    tokens = list(gen.token_ids)
    return {
        "tokens": len(tokens),
        "mean_logprob": sum(logps) / len(logps) if logps else None,
        "perplexity": math.exp(-sum(logps) / len(logps)) if logps and all(math.isfinite(x) for x in logps) else None,
        "mean_entropy": sum(ents) / len(ents) if ents else None,
        "distinct_2": distinct_n(tokens, 2),
        "repeated_3grams": repeated_ngrams(tokens, REPEAT_N),
        "finish": gen.finish_reason,
    }


# ---------------------------------------------------------------------- text with probabilities


SHADINGS = {"likely": "darker = more likely under the model", "surprise": "darker = more surprising (−log₂ p)"}


def _span(text: str, p: float, title: str, mark: bool, step: int, shading: str = "likely") -> str:
    body = html.escape(text).replace("\n", "↵<br>")
    p = max(0.0, min(1.0, p))
    if shading == "surprise":  # 0 bits (certain) pale, 8 bits (a 1-in-256 token) and more fully red
        alpha, rgb = 0.05 + 0.75 * min(1.0, -math.log2(max(p, 1e-12)) / 8), "214,39,40"
    else:
        alpha, rgb = 0.08 + 0.72 * math.sqrt(p), "31,119,180"  # sqrt: a 5% token is still visibly shaded
    border = "border-bottom:2px solid #d62728;" if mark else ""
    return (f'<span data-step="{step}" title="{html.escape(title, quote=True)}" style="background:rgba({rgb},{alpha:.2f});'
            f'border-radius:3px;padding:1px 0;cursor:pointer;{border}">{body}</span>')


def shaded_html(gen: Generation, prompt: str | None = None, since: int | None = None, shading: str = "likely") -> str:
    """The prompt (plain, grey) then each generated token shaded by its model probability (`shading`
    "likely": darker = more likely) or its surprisal ("surprise": darker = less likely); hovering a token
    shows its probabilities and rank, and each token's span carries its 1-based step (data-step) for a
    click. Tokens from step `since` on are underlined (where a branch diverges). All text is HTML-escaped."""
    parts = []
    if prompt:
        parts.append(f'<span style="color:#6b7280">{html.escape(prompt).replace(chr(10), "<br>")}</span>')
    for s in gen.steps:
        if gen.finish_reason == FINISH_STOP and s.step == len(gen.steps) - 1:  # the stop token itself
            parts.append('<span style="color:#6b7280;font-size:0.8em">■ end of text</span>')
            continue
        text = gen.token_text(s.token_id)
        title = (f"step {s.step + 1}: {visible(text)} · p={s.model_prob:.3f} (sampling p={s.sampled_prob:.3f}) · "
                 f"rank {s.rank}" + (" · the tool's output" if s.tool_output else " · forced (branch)" if s.forced else ""))
        parts.append(_span(text, s.model_prob, title, since is not None and s.step >= since, s.step + 1, shading))
    return ('<div style="font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:0.95rem;line-height:1.9;'
            'white-space:pre-wrap;word-break:break-word">' + "".join(parts) + "</div>")

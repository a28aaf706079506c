"""
Sane bounds for what is read from disk, checked here, once, before a value drives memory, a loop or SQL.

A checkpoint tree is input from strangers: a meta's `world_size: 10**9` would make the quick check
build a billion problems, `n_layer: 10**9` loop for minutes, `resume_segment: 2**70` overflow the
registry's integer columns, a JSON document nested 100,000 deep exhaust the recursion limit. So:

- `loads`: JSON (a meta, a metrics.jsonl line), refusing a document nested deeper than MAX_JSON_DEPTH
  before the recursive decoder sees it (a count of brackets, a linear scan only when that count is high);
- `name_number`: the step or rank in a checkpoint file name, None past MAX_STEP / MAX_WORLD_SIZE;
- `meta_problem`: the numbers of a checkpoint's meta (top-level keys the code reads, model_config,
  any integer anywhere) against their ranges, as one sentence, or None.

The metrics.jsonl line rules (step, segment, values) live in `registry.metrics.parse_metrics_line`,
using these bounds. This module reads no files and raises nothing but ValueError from `loads`.
"""

from __future__ import annotations

import functools
import json
import math
import re

MAX_JSON_DEPTH = 64  # a meta is 3 deep, a metrics line 1
MAX_META_BYTES = 16 << 20  # a meta is a few KB; reading a bigger one is refused before it is read
MAX_STEP = 2 ** 31 - 1  # steps and segments: the registry keeps them in 32-bit integer columns
MAX_WORLD_SIZE = 65536  # ranks: the quick check looks for one optimizer shard per rank
MAX_INT = 2 ** 63 - 1  # any integer of a meta: the registry stores some as 64-bit columns

# (low, high) of the top-level meta numbers the code reads. The low ends admit the "unset" values
# callers already treat as unknown (0, -1); the high ends are what a loop or a column can take.
META_RANGES = {
    "step": (0, MAX_STEP),
    "resume_segment": (0, MAX_STEP),
    "num_iterations": (-1, MAX_STEP),
    "world_size": (-1, MAX_WORLD_SIZE),
    "total_batch_size": (-1, 2 ** 40),
    "device_batch_size": (-1, 2 ** 24),
    "max_seq_len": (-1, 2 ** 24),
}
# model_config: what `GPTConfig` builds and `expected_state_shapes` loops over (n_layer) must stay small.
MODEL_CONFIG_RANGES = {
    "sequence_len": (1, 2 ** 24),
    "vocab_size": (1, 2 ** 24),
    "n_layer": (1, 1024),
    "n_head": (1, 2 ** 14),
    "n_kv_head": (1, 2 ** 14),
    "n_embd": (1, 2 ** 17),
}

_BRACKETS = {str: re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]'), bytes: re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')}


def json_depth_exceeds(data: str | bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether a JSON text nests arrays/objects deeper than `limit`, found without recursing."""
    opening = ("[", "{") if isinstance(data, str) else (b"[", b"{")
    if data.count(opening[0]) + data.count(opening[1]) <= limit:
        return False  # the common case: too few brackets to nest that deep, two C-level counts
    depth = 0
    for m in _BRACKETS[type(data)].finditer(data):  # strings are matched whole, so their brackets do not count
        c = m.group()[:1]
        if c in opening:
            depth += 1
            if depth > limit:
                return True
        elif c in ("]", "}", b"]", b"}"):
            depth -= 1
    return False


def loads(data: str | bytes, limit: int = MAX_JSON_DEPTH, parse_constant=None):
    """json.loads that refuses (ValueError) a document nested deeper than `limit`; `parse_constant`
    (json.loads') turns NaN/Infinity into something else (the meta reader: None)."""
    if json_depth_exceeds(data, limit):
        raise ValueError(f"nested deeper than {limit} levels")
    if type(data) is bytes and data[:1] == b"{" and data[1:2] != b"\0":
        # What json.loads decodes such bytes as (detect_encoding: no BOM, no UTF-16/32 zero byte), without
        # its per-call detection: the scanner parses tens of thousands of metrics lines.
        data = data.decode("utf-8", "surrogatepass")
    if type(data) is str and not data.startswith("\ufeff"):  # json.loads refuses a BOM with its own message
        return _decoder(parse_constant).decode(data)
    return json.loads(data, parse_constant=parse_constant)


@functools.lru_cache(maxsize=8)
def _decoder(parse_constant) -> json.JSONDecoder:
    """One decoder per parse_constant (json.loads builds a new one per call when given one)."""
    return json.JSONDecoder(parse_constant=parse_constant)


def name_number(digits: str, high: int = MAX_STEP) -> int | None:
    """The number in a checkpoint file name (step, or rank with high=MAX_WORLD_SIZE - 1); None past `high`."""
    if len(digits) > len(str(high)):
        return None
    n = int(digits)
    return n if n <= high else None


def _number_problem(key: str, value, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None  # not a number: the callers that read the key already ignore or report it
    if isinstance(value, float) and not math.isfinite(value):
        return f"{key} is {value}"
    if not low <= value <= high:
        return f"{key} {_show(value)} is out of range ({low} to {high})"
    return None


def meta_problem(meta: dict, text: str | None = None) -> str | None:
    """Why a meta's numbers cannot be used (the first reason, one sentence), or None. `text`: the JSON
    it was parsed from by `loads` (so it nests at most MAX_JSON_DEPTH deep), which spares the walk for
    integers past 64 bits when no run of 19 digits (the length of MAX_INT) appears in it."""
    # An int within its range (nearly every value) passes without a call: the scanner checks every meta.
    for key, (low, high) in META_RANGES.items():
        if key in meta:
            v = meta[key]
            if not (type(v) is int and low <= v <= high) and (why := _number_problem(key, v, low, high)):
                return why
    mc = meta.get("model_config")
    if isinstance(mc, dict):
        for key, (low, high) in MODEL_CONFIG_RANGES.items():
            if key in mc:
                v = mc[key]
                if not (type(v) is int and low <= v <= high) and \
                        (why := _number_problem(f"model_config.{key}", v, low, high)):
                    return why
    if text is not None and _LONG_DIGITS.search(text) is None:
        return None
    return _tree_problem(meta)


_LONG_DIGITS = re.compile("[0-9]{" + str(len(str(MAX_INT))) + "}")  # a JSON integer past MAX_INT has at least this many digits


_SCALARS = (str, float, bool, type(None))  # what _tree_problem passes over at once: the common leaves


def _tree_problem(meta: dict) -> str | None:
    """An integer past 64 bits anywhere in a meta, or nesting past MAX_JSON_DEPTH (a single file's meta
    comes from a pickle, not through `loads`), found without recursing."""
    stack = [(meta, "", 1)]
    scalars = _SCALARS
    while stack:
        obj, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return f"nested deeper than {MAX_JSON_DEPTH} levels"
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
        for k, v in items:
            t = type(v)
            if t is int:
                if -MAX_INT <= v <= MAX_INT:
                    continue
            elif t in scalars:
                continue
            if isinstance(v, int) and not isinstance(v, bool):
                if abs(v) > MAX_INT:
                    return f"{where}{k} {_show(v)} is out of range (at most {MAX_INT})"
            elif isinstance(v, (dict, list, tuple)):
                stack.append((v, f"{where}{k}.", depth + 1))
    return None


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "…"

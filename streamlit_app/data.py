"""
The app's one data module: which registry is open, and every read and write the pages make, cached.

Every `st.cache_data` / `st.cache_resource` of the app lives here (each with a ttl and max_entries), so
a page only reads its widgets, calls functions of this module and renders. Reads go through the
registry's store API (`registry.open_store`, frozen dataclasses out) and are turned into DataFrames by
`frames.py`; writes (scan, integrity checks, a deep resume plan) go through the registry too and then
clear the registry caches: every registry read is declared `@registry_read` (a test refuses a plain
`st.cache_data` taking the URL), so one call clears them all and none can be left stale. Models are
loaded once per checkpoint file (cache_resource) and sampled through `nanochat.engine`; both are
imported inside the functions that need them, so importing this module (and the app's entry point)
never imports torch. Sampling settings and results are the engine's own types from the torch-free
`nanochat.sampling`, passed by name (never as tuples).

Not here: SQL (the registry's business), sampling math (the engine's), layout (pages), drawing
(`charts.py`). Errors are the named exceptions of those layers; pages catch them at their edge.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd
import streamlit as st

from nanochat.common import DEFAULT_BASE_DIR
from nanochat.sampling import SamplingSettings, TraceOptions
from registry import open_store
from registry.db import DEFAULT_FILENAME, RegistryLocation, locate
from registry.errors import RegistryError, ScanPathError
from streamlit_app import frames, internals, traces

ROOT = Path(__file__).resolve().parent.parent
APP_FILE = Path(__file__).resolve().parent / "app.py"
DEMO_DIR = ROOT / ".demo"
TTL_S = 10  # registry reads: short, so a scan from the CLI or another tab shows up within seconds
LIVE_TTL_S = 3  # metric history while a run trains
MAX_POINTS = 2000  # per series, downsampled by the registry (extremes kept)
Progress = Callable[[int, int, str], None]  # (done, total, message)


# ---------------------------------------------------------------------- which registry


def app_args(argv: list[str] | None = None) -> list[str]:
    """The arguments after `--` in `streamlit run streamlit_app/app.py -- ...`; [] in any other process
    (AppTest runs the script inside pytest, whose arguments are not ours)."""
    argv = sys.argv if argv is None else argv
    if argv and Path(argv[0]).resolve() == APP_FILE:
        return list(argv[1:])
    return []


def _parse(args: list[str]) -> tuple[dict[str, str], str | None]:
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name not in ("--base-dir", "--db"):
            return out, f"unknown app argument {arg!r}: use -- --base-dir DIR or -- --db URL"
        if not eq:
            if i + 1 >= len(args):
                return out, f"{name} needs a value"
            value, i = args[i + 1], i + 1
        out[name] = value
        i += 1
    return out, None


def registry_target(args: list[str] | None = None, environ: Mapping[str, str] | None = None) -> RegistryLocation:
    """Which registry the app opens: the registry's one rule (`registry.db.locate`: --db, else --base-dir,
    else $NANOCHAT_REGISTRY_URL, else $NANOCHAT_BASE_DIR) with the demo as the default. A bad argument
    or folder is the result's `problem`, never an exception."""
    flags, problem = _parse(app_args() if args is None else args)
    if problem:
        return RegistryLocation("", "app arguments", str(DEFAULT_BASE_DIR.expanduser()), problem)
    return locate(db=flags.get("--db"), base_dir=flags.get("--base-dir"), environ=environ, default_base=DEMO_DIR,
                  default_source="demo", default_missing=(
                      f"No registry yet: the demo registry {DEMO_DIR / DEFAULT_FILENAME} does not exist. Build the demo with "
                      "`make app` (or `python -m scripts.demo`), or open your own runs with "
                      "`streamlit run streamlit_app/app.py -- --base-dir DIR` (or set NANOCHAT_BASE_DIR)."))


@st.cache_resource(max_entries=4, show_spinner=False)
def store(url: str):
    """The open registry (one per URL and process, shared by every session; the store is thread-safe)."""
    return open_store(url)


_REGISTRY_READS: list = []  # every @registry_read function, in definition order


def registry_read(ttl: float = TTL_S, max_entries: int = 16):
    """`st.cache_data` for a read of the registry (its first argument is the URL), registered so that
    `clear_registry_caches` clears it with every other: a new read cannot be forgotten there."""
    def register(fn):
        cached = st.cache_data(ttl=ttl, max_entries=max_entries, show_spinner=False)(fn)
        _REGISTRY_READS.append(cached)
        return cached

    return register


def clear_registry_caches() -> None:
    """After a write: every cached registry read is stale (models and generations are not)."""
    for fn in _REGISTRY_READS:
        fn.clear()


# ---------------------------------------------------------------------- runs


@registry_read()
def summary(url: str):
    return store(url).summary()


@registry_read()
def runs(url: str) -> list:
    """RunSummary list, newest activity first."""
    return store(url).list_runs()


def run_names(url: str) -> dict[int, str]:
    return frames.run_names(runs(url))


@registry_read()
def runs_table(url: str) -> pd.DataFrame:
    found = runs(url)
    return frames.runs_frame(found, frames.run_names(found))


@registry_read(ttl=LIVE_TTL_S, max_entries=64)
def metrics(url: str, run_ids: tuple[int, ...], keys: tuple[str, ...] = ("val_bpb", "train_loss"),
            max_points: int = MAX_POINTS) -> pd.DataFrame:
    """Long frame of the runs' series (downsampled by the registry to max_points each)."""
    s = store(url)
    found = runs(url)
    by_id = {r.id: r for r in found}
    series = []
    for rid in run_ids:
        if rid not in by_id:
            continue
        have = [k for k in keys if k in {info.key for info in s.metric_keys(rid)}]
        if have:
            series += s.metric_history(rid, have, max_points=max_points)
    df = frames.metric_frame(series, by_id, frames.run_names(found))
    df.attrs["stored_points"] = sum(x.total_points for x in series)
    return df


@registry_read(ttl=LIVE_TTL_S, max_entries=64)
def metric_keys(url: str, run_ids: tuple[int, ...]) -> list[str]:
    """Every metric key any of the runs has (the Runs page's metric picker)."""
    s = store(url)
    known = {r.id for r in runs(url)}
    return sorted({info.key for rid in run_ids if rid in known for info in s.metric_keys(rid)})


def refresh_runs(url: str, paths: list[str]) -> None:
    """Re-scan the given run folders (incremental: unchanged files cost a stat) for live curves. A read-only
    registry cannot take new points: it shows what it holds."""
    s = store(url)
    if s.read_only:
        return
    for p in paths:
        if Path(p).is_dir():
            s.scan(p)
    clear_registry_caches()


def scan(url: str, path: str, progress: Progress | None = None):
    """Index a folder (ScanReport); ScanPathError / NoCheckpointsError for a bad path."""
    if not path or not path.strip():
        raise ScanPathError("give a folder to scan (a nanochat base dir, or any folder with checkpoints)")
    report = store(url).scan(path.strip(), progress)
    clear_registry_caches()
    return report


def scan_or_import(url: str, path: str, progress: Progress | None = None):
    """What the scan box does: a folder is scanned and the upstream logs (*.log) and base_eval CSVs in it are
    imported; a log or CSV file is imported alone. Returns (ScanReport or None, LogsImport or None)."""
    if not path or not path.strip():
        raise ScanPathError("give a folder to scan (a nanochat base dir, or any folder with checkpoints) or a log file")
    p = Path(path.strip()).expanduser()
    report = None if p.is_file() else store(url).scan(path.strip(), progress)
    try:
        logs = store(url).import_logs(p)
    finally:
        clear_registry_caches()
    return report, logs


# ---------------------------------------------------------------------- checkpoints


@registry_read(max_entries=64)
def checkpoint_evals(url: str, run_id: int, step: int) -> pd.DataFrame:
    """The evaluation results recorded for one checkpoint (its run and step), one row each."""
    rows = [{"evaluation": e.key, "value": e.value, "examples": e.n_examples, "script": e.script,
             "source": Path(e.source).name} for e in store(url).eval_results(run_id, step)]
    return pd.DataFrame(rows, columns=["evaluation", "value", "examples", "script", "source"])


@registry_read(max_entries=32)
def checkpoints_table(url: str, run_id: int) -> pd.DataFrame:
    return frames.checkpoints_frame(store(url).checkpoints(run_id), run_names(url))


@registry_read(max_entries=8)
def all_checkpoints(url: str) -> pd.DataFrame:
    """Every checkpoint of every run, with its integrity state (Integrity, Generate, Compare)."""
    s = store(url)
    found = runs(url)
    # passing the RunSummary (not its id) spares the store re-resolving each run: one query per run
    return frames.checkpoints_frame([c for r in found for c in s.checkpoints(r)], frames.run_names(found))


@dataclasses.dataclass(frozen=True)
class CheckpointView:
    detail: object  # registry.entities.CheckpointDetail
    on_disk: dict  # file name -> exists now (a file can vanish after the last scan)

    @property
    def gone(self) -> list[str]:
        return [name for name, there in self.on_disk.items() if not there]


@registry_read(max_entries=64)
def checkpoint_detail(url: str, checkpoint_id: int) -> CheckpointView:
    detail = store(url).checkpoint_detail(checkpoint_id)
    return CheckpointView(detail, {f.name: Path(f.path).exists() for f in detail.files})


@registry_read(ttl=60, max_entries=32)
def config_diff(url: str, a: str, b: str):
    """ConfigDiff of two runs (their ids) or two checkpoints ("RUN_ID@STEP")."""
    return store(url).diff(a, b)


@registry_read(max_entries=64)
def integrity_history(url: str, checkpoint_id: int) -> pd.DataFrame:
    return frames.integrity_history_frame(store(url).integrity_history(checkpoint_id))


# ---------------------------------------------------------------------- resume


def _run_dir(url: str, run_id: int) -> str:
    run = store(url).get_run(run_id)
    if not Path(run.path).is_dir():
        raise ScanPathError(f"{run.label}'s folder {run.path} no longer exists (its history is kept in the registry)")
    return run.path


@registry_read(ttl=30)
def resume_plan(url: str, run_id: int, target_steps: int | None = None):
    """The planner's report from the files, reusing deep results the registry holds while the files are
    unchanged; quick checks run as needed and are not recorded (viewing a page writes nothing)."""
    from registry import resume, verify

    path = _run_dir(url, run_id)
    known = verify.known_results(store(url), path)
    return resume.plan_resume(path, target_steps=target_steps, known=known)


def deep_resume_plan(url: str, run_id: int, target_steps: int | None = None):
    """Deep-check (recorded in the registry) and plan: `python -m registry resume RUN --deep`."""
    from registry import verify

    plan = verify.plan_indexed_resume(store(url), _run_dir(url, run_id), target_steps=target_steps, deep=True)
    clear_registry_caches()
    return plan


# ---------------------------------------------------------------------- integrity


def verify_runs(url: str, run_ids: list[int], deep: bool, progress: Progress | None = None) -> pd.DataFrame:
    """Check every checkpoint of the runs (recorded in the registry) and return one row per checkpoint.
    progress(done, total, text) after each checkpoint (deep: also while reading its bytes)."""
    from registry import integrity, verify

    s = store(url)
    targets = []
    for rid in run_ids:
        path = _run_dir(url, rid)
        root, found = verify.resolve_target(s, path)
        targets.append((path, found))
    total = sum(len(found) for _, found in targets)
    total_bytes = sum(integrity.checkpoint_bytes(c) for _, found in targets for c in found) if deep else 0
    state = {"done": 0, "bytes": 0}

    def tell(extra: str = "") -> None:
        if progress:
            text = f"checked {state['done']}/{total} checkpoints{extra}"
            progress(state["done"], total, text)

    def on_bytes(n: int) -> None:
        state["bytes"] += n
        if deep and total_bytes:
            tell(f" · {state['bytes'] / 1e6:,.0f} / {total_bytes / 1e6:,.0f} MB read")

    def on_result(_checked) -> None:
        state["done"] += 1
        tell()

    results = []
    try:
        for path, found in targets:
            report = verify.verify(s, path, deep=deep, progress=on_bytes if deep else None, on_result=on_result,
                                   checkpoints=found)
            results += report.results
    finally:
        clear_registry_caches()
    rows = [{"run": r.run, "step": r.result.step, "level": r.result.level, "result": "✓ ok" if r.result.ok else "⚠ problems",
             "problems": ", ".join(r.result.codes),
             "messages": "; ".join(f"{p.code}: {p.message}" for p in r.result.problems),
             "duration_s": r.result.duration_s, "mb_read": r.result.bytes_read / 1e6} for r in results]
    return pd.DataFrame(rows, columns=["run", "step", "level", "result", "problems", "messages", "duration_s", "mb_read"])


# ---------------------------------------------------------------------- models and sampling


def file_stamp(path: str | os.PathLike) -> tuple:
    """(size, mtime_ns) of a file, () when absent: part of a cache key, so a rewritten file is read again.
    Every stamp in this module (models, tokenizers, shards, metas, conversation files) is built from it."""
    try:
        st_ = os.stat(path)
    except OSError:
        return ()
    return (st_.st_size, st_.st_mtime_ns)


def model_stamp(directory: str, step: int | None) -> tuple:
    """The model file's stamp (`file_stamp`): part of the model cache key, so a rewritten file reloads."""
    return file_stamp(Path(directory) / (f"model_{step:06d}.pt" if step is not None else "checkpoint.pt"))


@st.cache_resource(max_entries=3, ttl=3600, show_spinner=False)
def model(directory: str, step: int | None, stamp: tuple):
    """(LoadedModel, Engine) of one checkpoint, loaded once (weights_only) and shared by all sessions."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.engine import Engine

    loaded = load_model(directory, step=step)
    return loaded, Engine(loaded.model, loaded.tokenizer)


def _token_text(tokenizer) -> Callable[[int], str]:
    memo: dict[int, str] = {}

    def text(i: int) -> str:
        if i not in memo:
            memo[i] = tokenizer.decode([i])
        return memo[i]

    return text


@st.cache_data(ttl=3600, max_entries=128, show_spinner=False)
def generate(directory: str, step: int | None, stamp: tuple, prompt: str, chat: bool, settings: SamplingSettings,
             max_tokens: int, top_n: int, forced: tuple = ()) -> traces.Generation:
    """One traced generation. forced: ((step, token), ...) makes the engine emit those tokens (a branch).
    Same arguments, same result: it is cached (the settings, a frozen dataclass, are hashed by field)."""
    loaded, engine = model(directory, step, stamp)
    ids = engine.encode(prompt, chat=chat)
    rows = engine.generate(ids, settings, max_tokens, trace=TraceOptions(top_n=top_n),
                           forced={0: dict(forced)} if forced else None)
    return traces.from_row(rows[0], _token_text(loaded.tokenizer), forced, prompt_tokens=len(ids))


@st.cache_data(ttl=3600, max_entries=32, show_spinner=False)
def compare(directory: str, step: int | None, stamp: tuple, prompt: str, chat: bool,
            settings: tuple[SamplingSettings, ...], max_tokens: int) -> list[traces.Generation]:
    """Every one of `settings` as one row of ONE batched engine call."""
    loaded, engine = model(directory, step, stamp)
    ids = engine.encode(prompt, chat=chat)
    rows = engine.generate(ids, list(settings), max_tokens, trace=TraceOptions(top_n=0))
    text = _token_text(loaded.tokenizer)
    return [traces.from_row(r, text, prompt_tokens=len(ids)) for r in rows]


def model_choices(url: str) -> pd.DataFrame:
    """Checkpoints a model can be loaded from: complete and on disk (as far as the registry knows)."""
    df = all_checkpoints(url)
    ok = df[(df["state"] != "missing") & (df["state"] != "incomplete") & df["step"].notna()]
    return ok.sort_values(["run_id", "step"]).reset_index(drop=True)


# ---------------------------------------------------------------------- the model calculator


@st.cache_data(max_entries=256, show_spinner=False)
def model_estimate(flags: dict, vocab_size: int, world_size: int = 1, activation_bytes: int = 2) -> dict:
    """What base_train would build and run from these flags (a user_config; classic upstream's carries
    `warmup_ratio`), derived by nanochat.train_config, the functions training itself calls: config,
    parameters, FLOPs/token, memory per device, steps, tokens, and why training would refuse them.
    Raises ArchitectureError when the flags describe no buildable model."""
    from nanochat import model_config as mc
    from nanochat import train_config as tc

    shape = tc.run_shape(flags, vocab_size=vocab_size, world_size=world_size)
    fpt = shape.flops_per_token
    return {
        "config": dataclasses.asdict(shape.config), "head_dim": shape.config.head_dim, "params": shape.params,
        "flops_per_token": fpt,
        "memory": mc.training_memory_bytes(shape.config, int(tc.flag_values(flags)["device_batch_size"]),
                                           activation_bytes),
        "total_batch_size": shape.total_batch_size, "num_iterations": shape.num_iterations, "tokens": shape.tokens,
        "total_flops": shape.tokens * fpt if shape.tokens else None, "tokens_per_param": shape.tokens_per_param,
        "grad_accum": shape.grad_accum, "notes": list(shape.problems),
    }


def problem_codes() -> pd.DataFrame:
    """Every integrity problem code with its meaning (registry.integrity.PROBLEM_CODES)."""
    from registry.integrity import PROBLEM_CODES

    return pd.DataFrame([{"code": k, "meaning": v} for k, v in PROBLEM_CODES.items()], columns=["code", "meaning"])


# ====================================================================== data: tokenizers and datasets (issue 13)
# The Tokenizer and Dataset pages. Tokenizers are cached per (folder, file stamp); dataset reads per
# (folder, stamps of its shards), so a rewritten file is read again. Inspection passes go through the
# registry (`registry/datasets.py`), which stores their results: reopening a folder costs a stat per shard.


def tokenizer_stamp(directory: str) -> tuple:
    d = Path(directory)
    return tuple(file_stamp(d / name) for name in ("tokenizer.json", "tokenizer.pkl", "token_bytes.pt"))


def _base_dirs(url: str) -> list[Path]:
    """Base dirs the open registry knows: where scans start, and the folders above each run."""
    found = [Path(registry_target().scan_default).expanduser()]
    try:
        for r in runs(url):
            p = Path(r.path)
            found.append(p.parent.parent if p.parent.name.endswith("_checkpoints") else p.parent)
    except RegistryError:  # no registry: the scan default alone (the page shows the registry's error)
        pass
    out: list[Path] = []
    for p in found:
        if p not in out:
            out.append(p)
    return out


@registry_read(max_entries=8)
def tokenizer_choices(url: str) -> list[str]:
    """Tokenizer folders the registry's runs use (their base dir's tokenizer/), existing ones only."""
    return [str(d / "tokenizer") for d in _base_dirs(url)
            if (d / "tokenizer" / "tokenizer.json").is_file() or (d / "tokenizer" / "tokenizer.pkl").is_file()]


@registry_read(max_entries=8)
def dataset_choices(url: str) -> list[str]:
    """Data folders of the registry's base dirs (base_data_climbmix/ or base_data/ with shards)."""
    from nanochat.dataloader import DataError, find_data_dir

    out = []
    for d in _base_dirs(url):
        try:
            out.append(str(find_data_dir(d)))
        except DataError:
            continue
    return list(dict.fromkeys(out))


@registry_read(max_entries=8)
def conversation_choices(url: str) -> list[str]:
    """Conversation files (SFT data, *.jsonl) in the registry's base dirs, e.g. identity_conversations.jsonl and
    the demo's conversations/plays.jsonl."""
    from nanochat.conversation_file import base_dir_conversation_files

    return [str(f) for d in _base_dirs(url) if d.is_dir() for f in base_dir_conversation_files(d)]


def default_conversation_file(base_dir: str | None) -> str:
    """The file the Conversation builder opens first: the base dir's first conversation file (upstream's
    identity_conversations.jsonl, else e.g. the demo's conversations/plays.jsonl), else where upstream's would be."""
    from nanochat.conversation_file import UPSTREAM_FILE, base_dir_conversation_files

    base = Path(base_dir or ".").expanduser()
    return str(next(iter(base_dir_conversation_files(base)), base / UPSTREAM_FILE))


def conversation_files(path: str) -> tuple[str, ...]:
    """The conversation files a path names (a .jsonl, or a folder of them without shards); () for shards."""
    from nanochat.conversation_file import conversation_files as files

    return tuple(str(f) for f in files(path))


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def conversation_summaries(paths: tuple[str, ...], stamps: tuple, tokenizer_dir: str, tok_stamp: tuple, seq_len: int) -> dict:
    """Conversation files rendered with upstream's template and summed up against seq_len (the conversation
    builder's summary): {"files": one row per file, "summary": the DatasetSummary of all, "findings",
    "histogram": start, end, count}. Raises TokenizerError for a tokenizer without the chat tokens."""
    from nanochat import conversation_file as cf

    template = chat_tokenizer(tokenizer_dir).chat_template()
    per_file, total = cf.summarize_files(list(paths), template, seq_len)
    rows = []
    for f in per_file:
        d = f.summary.as_dict() if f.summary else {}
        rows.append({"file": Path(f.path).name, "conversations": d.get("conversations"), "invalid": d.get("invalid"),
                     "too_long": d.get("too_long"), "too_long_share": d.get("too_long_share"), "cut": d.get("cut"),
                     "supervised_share": d.get("supervised_share"), "tool_use_share": d.get("tool_use_share"),
                     "mean_tokens": d.get("length_mean"), "max_tokens": d.get("length_max"), "error": f.error or ""})
    hist = pd.DataFrame([{"start": b.start, "end": b.end, "count": b.count} for b in total.histogram],
                        columns=["start", "end", "count"])
    return {"files": pd.DataFrame(rows), "summary": total, "findings": cf.findings(per_file, total), "histogram": hist}


def file_stamps(paths: tuple[str, ...]) -> tuple:
    return tuple(file_stamp(p) for p in paths)


@st.cache_resource(max_entries=8, ttl=3600, show_spinner=False)
def tokenizer(directory: str, stamp: tuple):
    from nanochat.tokenizer import Tokenizer

    return Tokenizer.from_directory(directory)


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def tokenizer_info(directory: str, stamp: tuple) -> dict:
    from nanochat import tokenizer_inspect as ti

    tok = tokenizer(directory, stamp)
    return {"file": ti.tokenizer_file(directory).name, "fingerprint": ti.fingerprint(directory),
            "vocab_size": tok.get_vocab_size(),
            "special": pd.DataFrame([{"token": n, "id": i, "role": r} for n, i, r in ti.special_tokens(tok)])}


@st.cache_data(ttl=3600, max_entries=64, show_spinner=False)
def token_pieces(directory: str, stamp: tuple, text: str, specials_in_text: bool = True) -> pd.DataFrame:
    """One row per token of `text`: position, id, shown text (visible whitespace), kind, bytes. Without
    `specials_in_text`, a typed <|bos|> is plain text (a training document)."""
    from nanochat import tokenizer_inspect as ti

    pieces = ti.split(tokenizer(directory, stamp), text, specials_in_text)
    return pd.DataFrame([{"pos": k, "id": p.id, "shown": p.shown, "kind": p.kind, "bytes": len(p.raw)}
                         for k, p in enumerate(pieces)], columns=["pos", "id", "shown", "kind", "bytes"])


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def validation_sample(data_dir: str, stamps: tuple, max_docs: int = 300) -> list[str]:
    """Documents from a few row groups of the validation shard (the last) of a data folder."""
    from nanochat import shards

    _, files = shards.resolve_data_dir(data_dir)
    return [d.text for d in shards.sample_documents(files[-1:], max_docs=max_docs)]


def shard_files(data_dirs: tuple[str, ...]) -> list[str]:
    """Every parquet shard of these data folders (paths), in folder then file order."""
    from nanochat import shards
    from nanochat.dataloader import DataError

    out = []
    for d in data_dirs:
        try:
            out += [str(f) for f in shards.resolve_data_dir(d)[1]]
        except DataError:
            continue
    return out


@st.cache_data(ttl=3600, max_entries=32, show_spinner=False)
def shard_document(path: str, stamp: tuple, index: int):
    """(the index-th Document of a shard, how many it holds); ValueError (one line) when out of range."""
    from nanochat import shards

    return shards.document_at(path, index)


def shard_stamps(data_dir: str) -> tuple:
    from nanochat import shards

    _, files = shards.resolve_data_dir(data_dir)
    return tuple((f.name, *file_stamp(f)) for f in files)


@st.cache_data(ttl=3600, max_entries=32, show_spinner=False)
def tokenizer_comparison(directories: tuple[str, ...], stamps: tuple, texts: tuple[str, ...], specials_in_text: bool) -> pd.DataFrame:
    """Tokens, bytes and bytes per token of the same texts under each tokenizer; `bpb_factor`: the bpb of
    an equal per-token loss, relative to the first tokenizer."""
    from nanochat import tokenizer_inspect as ti

    toks = {d: tokenizer(d, s) for d, s in zip(directories, stamps)}
    result = ti.compare(toks, list(texts), specials_in_text)
    first = next(iter(result.values())).bytes_per_token
    return pd.DataFrame([{"tokenizer": d, "tokens": c.tokens, "bytes": c.bytes, "chars": c.chars,
                          "bytes_per_token": c.bytes_per_token,
                          "bpb_factor": first / c.bytes_per_token if c.bytes_per_token else None} for d, c in result.items()])


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def vocabulary_table(directory: str, stamp: tuple, sample_key: tuple = (), sample: tuple[str, ...] = ()) -> pd.DataFrame:
    """Every token: id, shown text, bytes, kind, and whether it occurs in `sample` (None without one)."""
    from nanochat import tokenizer_inspect as ti

    tok = tokenizer(directory, stamp)
    unused = ti.unused_ids(tok, sample) if sample else None
    return pd.DataFrame([{"id": v.id, "token": v.shown, "bytes": len(v.raw), "kind": v.kind,
                          "used_on_sample": None if unused is None else (v.kind == "special" or v.id not in unused)}
                         for v in ti.vocabulary(tok)])


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def token_bytes_check(directory: str, stamp: tuple):
    """nanochat.tokenizer_inspect.TokenBytesCheck of the folder's token_bytes.pt."""
    from nanochat import tokenizer_inspect as ti

    return ti.check_token_bytes(tokenizer(directory, stamp))


def inspect_dataset(url: str, data_dir: str, tokenizer_dir: str | None, exact: bool, world_size: int,
                    progress=None, should_stop=None):
    """The registry's inspection of a data folder (a pass only over changed shards); not cached here:
    the registry is the cache, and reopening costs one stat per shard."""
    report = store(url).inspect_dataset(data_dir, tokenizer_dir, exact=exact, world_size=world_size, progress=progress,
                                        should_stop=should_stop)
    summary.clear()
    return report


def shards_table(report) -> pd.DataFrame:
    rows = []
    for r in report.shards:
        s, t = r.stats, r.tokens(report.tokenizer)
        rows.append({"shard": s.name, "split": "validation" if s.name == report.findings.validation else "train",
                     "size_mb": s.size / 1e6, "rows": s.rows, "row_groups": s.row_groups, "docs": s.docs, "chars": s.chars,
                     "tokens": t.tokens if t else None, "counted": ("exact" if t.exact else "sampled") if t else "",
                     "empty": s.empty, "duplicates": s.duplicates, "noisy": s.noisy + s.invalid_utf8,
                     "error": s.error or "", "inspected": r.inspected_at})
    return pd.DataFrame(rows)


def length_histogram(report) -> pd.DataFrame:
    """Documents per length bin (characters), train and validation apart."""
    from nanochat.shards import HIST_EDGES

    rows = []
    for r in report.shards:
        split = "validation" if r.stats.name == report.findings.validation else "train"
        for k, n in enumerate(r.stats.hist):
            lo, hi = HIST_EDGES[k], (HIST_EDGES[k + 1] if k + 1 < len(HIST_EDGES) else None)
            rows.append({"split": split, "bin": k, "low": lo, "label": f"{lo:,}–{hi - 1:,}" if hi and hi - 1 > lo
                         else (f"{lo:,}" if hi else f"{lo:,}+"), "docs": n})
    df = pd.DataFrame(rows, columns=["split", "bin", "low", "label", "docs"])
    return df.groupby(["split", "bin", "low", "label"], as_index=False)["docs"].sum() if not df.empty else df


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def near_duplicates(data_dir: str, stamps: tuple, sample: int = 2000) -> tuple[int, pd.DataFrame]:
    from nanochat import shards

    _, files = shards.resolve_data_dir(data_dir)
    docs = shards.sample_documents(files, max_docs=sample)
    pairs = shards.near_duplicates(docs)
    text = {d.ref: d.text for d in docs}
    return len(docs), pd.DataFrame([{"similarity": p.similarity, "a": p.a.label(), "b": p.b.label(),
                                     "a_text": text[p.a][:300], "b_text": text[p.b][:300]} for p in pairs],
                                   columns=["similarity", "a", "b", "a_text", "b_text"])


@st.cache_data(ttl=3600, max_entries=32, show_spinner=False)
def documents(data_dir: str, stamps: tuple, needle: str = "", n: int = 5, seed: int = 0) -> list:
    """n documents containing `needle`, or at random (seeded) when it is empty."""
    from nanochat import shards

    _, files = shards.resolve_data_dir(data_dir)
    if needle:
        return list(shards.search(files, needle, limit=n))
    return shards.random_documents(files, n, seed=seed)


def run_choices_for_replay(url: str) -> list:
    """Runs of our trainer (a checkpoint with a training state), newest activity first."""
    return [r for r in runs(url) if not r.missing]


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def step_batch(run_dir: str, step: int, stamp: tuple):
    """nanochat.data_replay.StepBatch: what rank 0 trained on at `step` (the loader replayed from the
    nearest saved state; imports torch)."""
    from nanochat.data_replay import step_batch as replay

    return replay(run_dir, step)


def run_stamp(run_dir: str) -> tuple:
    """Names, sizes and mtimes of a run's meta files: a new checkpoint changes the replay cache key."""
    d = Path(run_dir)
    return tuple(sorted((p.name, *file_stamp(p)) for p in d.glob("meta_*.json"))) if d.is_dir() else ()


def step_segments(batch) -> pd.DataFrame:
    rows = []
    for k, m in enumerate(batch.micro_batches):
        for s in m.segments:
            rows.append({"micro_batch": k, "row": s.row, "offset": s.offset, "length": s.length, "doc_tokens": s.doc_tokens,
                         "cropped": s.cropped, "source": f"{s.shard} · rg {s.row_group} · row {s.doc_row}" if s.shard
                         else "in the loader's buffer at the restored checkpoint", "text": s.text})
    return pd.DataFrame(rows)


def approximate_position(run_dir: str) -> str | None:
    """For an upstream run: where its newest meta says the loader was."""
    from nanochat import checkpoint_manager as cm
    from nanochat.data_replay import approximate_position as where

    try:
        found = [c for c in cm.list_checkpoints(run_dir) if c.meta is not None]
        return where(cm.read_meta(found[-1])) if found else None
    except cm.CheckpointError:
        return None


# ---------------------------------------------------------------------- conversations (the builder page)


def tokenizer_dir_for(run_path: str) -> str | None:
    """The tokenizer folder a run was trained with (beside its checkpoints, or $NANOCHAT_BASE_DIR's)."""
    from nanochat.checkpoint_manager import find_tokenizer_dir

    found = find_tokenizer_dir(run_path)
    return str(found) if found else None


def chat_tokenizer(tokenizer_dir: str):
    """The Tokenizer of a folder (with its chat template), read once per file version; raises
    TokenizerError (one line) for a missing, damaged or non-chat tokenizer."""
    from nanochat.tokenizer import TokenizerError

    if not Path(tokenizer_dir).expanduser().is_dir():
        raise TokenizerError(f"no tokenizer folder {tokenizer_dir}")
    d = str(Path(tokenizer_dir).expanduser())
    tok = tokenizer(d, tokenizer_stamp(d))  # the one tokenizer cache (Tokenizer and Dataset pages share it)
    tok.chat_template()  # a tokenizer without the chat tokens fails here with a TokenizerError
    return tok


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def conversation_entries(path: str, stamp: tuple) -> list:
    """Every non-empty line of a conversation file as a nanochat.conversation_file.Entry (read only)."""
    from nanochat.conversation_file import read_conversations

    return read_conversations(path)


@st.cache_data(ttl=3600, max_entries=8, show_spinner=False)
def conversation_table(path: str, stamp: tuple, tokenizer_dir: str, seq_len: int):
    """(one row per line: line, valid, error, turns, length, trained, tool_use, fits, cut, preview;
    the DatasetSummary) of a conversation file rendered with the tokenizer against seq_len."""
    from nanochat.conversation_file import fit, summarize

    entries = conversation_entries(path, stamp)
    template = chat_tokenizer(tokenizer_dir).chat_template()
    renders = template.render_batch([e.conversation for e in entries if e.valid])
    summary = summarize(entries, template, seq_len, renders=renders)
    rows, it = [], iter(renders)
    for e in entries:
        if not e.valid:
            rows.append({"line": e.line, "valid": False, "error": e.error, "turns": None, "length": None,
                         "trained": None, "tool_use": None, "fits": None, "cut": None, "preview": e.raw[:120]})
            continue
        r = next(it)
        first = next((m.content for m in e.conversation.turns if m.role == "user"), "")
        rows.append({"line": e.line, "valid": True, "error": "", "turns": len(e.conversation.turns), "length": r.length,
                     "trained": r.supervised, "tool_use": e.conversation.has_tool_use, "fits": fit(r, seq_len).fits,
                     "cut": r.truncated, "preview": first[:120]})
    cols = ["line", "valid", "error", "turns", "length", "trained", "tool_use", "fits", "cut", "preview"]
    return pd.DataFrame(rows, columns=cols), summary


def render_conversation(tokenizer_dir: str, messages: list[dict], seq_len: int) -> dict:
    """The editor's view of one conversation: its Conversation, Rendered (upstream's 2048 cut), Fit
    against seq_len, and a per-token frame (position, id, text, mask, kind, message). Raises
    ConversationError (one line) for an ill-formed conversation. Uncached: one render is ~0.1 ms."""
    from nanochat.conversation import Conversation
    from nanochat.conversation_file import fit

    tok = chat_tokenizer(tokenizer_dir)
    template = tok.chat_template()
    conv = Conversation.parse(messages)
    r = template.render(conv)
    owner = [None] * len(r.ids)
    for span in r.spans:
        for i in range(span.start, min(span.end, len(r.ids))):
            owner[i] = span.message
    text = _token_text(tok)
    frame = pd.DataFrame({"position": range(len(r.ids)), "id": r.ids, "text": [text(i) for i in r.ids],
                          "mask": r.mask, "kind": template.token_kinds(r), "message": owner})
    return {"conversation": conv, "rendered": r, "fit": fit(r, seq_len), "tokens": frame}


def save_conversations(path: str, entries: list) -> int:
    """Write entries (nanochat.conversation_file.Entry, kept lines as read) atomically; re-read next time."""
    from nanochat.conversation_file import write_conversations

    n = write_conversations(path, entries)
    conversation_entries.clear()
    conversation_table.clear()
    return n


# ---------------------------------------------------------------------- inside the model: attention and the logit lens

ATTENTION_CELLS = 128  # positions per side kept for the large views (block-averaged beyond: nanochat.attention.downsample)
GRID_CELLS = 32  # positions per side of each thumbnail in the layer x head grid
EVOLUTION_CELLS = 32  # positions per side of one head's pattern at each checkpoint
MAX_EVOLUTION_STEPS = 8  # checkpoints read for "how the head formed" (evenly spaced, the last included)


@dataclasses.dataclass(frozen=True)
class AttentionData:
    """One prompt's attention through the explicit path, as plain arrays (no torch leaves this module)."""
    tokens: tuple[str, ...]  # each position's text
    token_ids: tuple[int, ...]
    generated: int  # positions at the end that the greedy continuation added
    windows: tuple[int, ...]
    n_layer: int
    n_head: int
    n_kv_head: int
    factor: int  # positions per cell of `weights` (1 = exact)
    weights: object  # numpy (n_layer, n_head, n, n) float32, rows = queries
    grid_factor: int
    grid: object  # numpy (n_layer, n_head, g, g) float32: the thumbnails
    scores: pd.DataFrame  # one row per head (nanochat.attention.HeadScores fields + pattern)


def _attention_ids(engine, prompt: str, continue_tokens: int) -> tuple[list[int], int]:
    ids = engine.encode(prompt)
    if continue_tokens <= 0:
        return ids, 0
    room = engine.model.config.sequence_len - len(ids)
    row = engine.generate(ids, SamplingSettings(temperature=0.0), max(1, min(continue_tokens, room)))[0]
    return ids + list(row.token_ids), len(row.token_ids)


def _capture(directory: str, step: int | None, stamp: tuple, prompt: str, continue_tokens: int):
    from nanochat.attention import capture

    loaded, engine = model(directory, step, stamp)
    ids, generated = _attention_ids(engine, prompt, continue_tokens)
    return loaded, capture(loaded.model, ids), generated


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def attention(directory: str, step: int | None, stamp: tuple, prompt: str, continue_tokens: int = 0) -> AttentionData:
    """Every layer's and head's attention for `prompt` (plus a greedy continuation of `continue_tokens`),
    with the per-head summaries. Raises a SamplingError (nanochat.attention.AttentionInputError) for a prompt beyond the model's context."""
    from nanochat.attention import head_scores, weights_array

    loaded, cap, generated = _capture(directory, step, stamp, prompt, continue_tokens)
    big, factor = weights_array(cap, ATTENTION_CELLS)
    small, grid_factor = weights_array(cap, GRID_CELLS)
    scores = pd.DataFrame([{**dataclasses.asdict(s), "pattern": s.pattern} for s in head_scores(cap)])
    text = _token_text(loaded.tokenizer)
    return AttentionData(tuple(text(i) for i in cap.token_ids), tuple(cap.token_ids), generated, tuple(cap.windows),
                         cap.n_layer, cap.n_head, cap.n_kv_head, factor, big, grid_factor, small, scores)


@st.cache_data(ttl=3600, max_entries=64, show_spinner=False)
def logit_lens(directory: str, step: int | None, stamp: tuple, prompt: str, continue_tokens: int, position: int,
               top: int = 5) -> pd.DataFrame:
    """What each layer would predict after `position`: columns layer, rank, token, token_id, prob."""
    from nanochat.attention import logit_lens as lens

    loaded, cap, _ = _capture(directory, step, stamp, prompt, continue_tokens)
    text = _token_text(loaded.tokenizer)
    rows = [{"layer": r.layer, "rank": k + 1, "token": traces.visible(text(i)), "token_id": i, "prob": p}
            for r in lens(loaded.model, cap, position, top) for k, (i, p) in enumerate(zip(r.token_ids, r.probs))]
    return pd.DataFrame(rows, columns=["layer", "rank", "token", "token_id", "prob"])


def evolution_steps(steps: list[int]) -> list[int]:
    """At most MAX_EVOLUTION_STEPS of a run's checkpoint steps, evenly spaced, first and last included."""
    steps = sorted(steps)
    if len(steps) <= MAX_EVOLUTION_STEPS:
        return steps
    n = MAX_EVOLUTION_STEPS
    return sorted({steps[round(i * (len(steps) - 1) / (n - 1))] for i in range(n)})


@st.cache_data(ttl=3600, max_entries=16, show_spinner=False)
def head_over_steps(directory: str, steps: tuple[int, ...], prompt: str, layer: int, head: int,
                    _progress: Progress | None = None) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """One head's pattern and scores at each of `steps` of a run: (cells: step, q, k, weight; scores: one
    row per step; positions per cell). Each checkpoint is loaded through the shared model cache."""
    from nanochat.attention import capture, head_cells, head_scores

    cells, scores, factor = [], [], 1
    for n, s in enumerate(steps):
        if _progress:  # leading underscore: not part of the cache key
            _progress(n, len(steps), f"step {s:,}")
        loaded, engine = model(directory, s, model_stamp(directory, s))
        cap = capture(loaded.model, engine.encode(prompt))
        if layer >= cap.n_layer or head >= cap.n_head:
            continue
        q, k, w, factor = head_cells(cap, layer, head, EVOLUTION_CELLS)
        cells.append(pd.DataFrame({"step": s, "q": q, "k": k, "weight": w}))
        sc = next(x for x in head_scores(cap) if x.layer == layer and x.head == head)
        scores.append({"step": s, **dataclasses.asdict(sc), "pattern": sc.pattern})
    cells_df = pd.concat(cells, ignore_index=True) if cells else pd.DataFrame(columns=["step", "q", "k", "weight"])
    return cells_df, pd.DataFrame(scores), factor


# ---------------------------------------------------------------------- learning-rate finds and sweeps

LR_FIND_PHASE = "lrfind"
LR_FIND_KEYS = ("lr_mult", "train_loss", "smooth_loss")
LR_FIND_FILE = "lr_find.json"  # scripts/lr_find.py's result beside its metrics.jsonl


def lr_finds(url: str) -> list:
    """The registry's learning-rate finds (phase lrfind), newest activity first."""
    return [r for r in runs(url) if r.phase == LR_FIND_PHASE]


@st.cache_data(ttl=TTL_S, max_entries=64, show_spinner=False)
def lr_find_settings(run_dir: str) -> dict:
    """A find's lr_find.json (group, range, flags, base learning rates); {} when absent or unreadable."""
    import json

    try:
        found = json.loads((Path(run_dir) / LR_FIND_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


@registry_read(ttl=LIVE_TTL_S, max_entries=32)
def lr_find_curves(url: str, run_ids: tuple[int, ...]) -> tuple[pd.DataFrame, dict]:
    """(one row per find and step: lr_mult, train_loss, smooth_loss; {run_id: Suggestion}) from the
    registry's metrics, the suggestion computed by nanochat.lr_range as the script computed it."""
    from nanochat import lr_range

    curves = internals.find_curves(metrics(url, run_ids, LR_FIND_KEYS))
    out = {}
    for rid, df in curves.groupby("run_id"):
        out[int(rid)] = lr_range.suggest(list(df["lr_mult"]), list(df["smooth_loss"]))
    return curves, out


@registry_read(max_entries=16)
def sweeps(url: str) -> list:
    """Groups of runs that differ in one setting (internals.find_sweeps over the registry's runs)."""
    return internals.find_sweeps([r for r in runs(url) if r.phase != LR_FIND_PHASE])


# ---------------------------------------------------------------------- chat (the Chat page)


class ReplyStream:
    """One assistant reply of the Chat page as it is generated: iterate for its text as it grows
    (`st.write_stream`), then read `.reply` (a traces.ChatReply). The model comes from the one model
    cache, so a chat keeps the checkpoint Generate and Compare loaded. The prompt is the conversation
    rendered with the chat template; the engine runs its tool loop (the calculator), and its checks
    (prompt longer than the context, settings) raise SamplingError here, before any token."""

    def __init__(self, directory: str, step: int | None, stamp: tuple, messages: list[dict], settings: SamplingSettings,
                 max_tokens: int, top_n: int, forced: tuple = ()):
        from nanochat.engine import ResultBuilder

        self._loaded, engine = model(directory, step, stamp)
        self.prompt_ids = engine.render_chat(list(messages))
        options = TraceOptions(top_n=top_n)
        self._events = engine.stream(self.prompt_ids, settings, max_tokens, trace=options,
                                     forced={0: dict(forced)} if forced else None, tools=True)
        self._builder = ResultBuilder(engine, [settings], options)
        self.forced = tuple(forced)
        self.reply: traces.ChatReply | None = None

    def __iter__(self):
        from nanochat.conversation import Message

        yield from self._builder.text_deltas(self._events)
        row = self._builder.results()[0]
        tok = self._loaded.tokenizer
        content = Message("assistant", tok.chat_template().reply_content(row.token_ids)).to_dict()["content"]
        gen = traces.from_row(row, _token_text(tok), self.forced, prompt_tokens=len(self.prompt_ids))
        self.reply = traces.ChatReply(gen, content)


def chat_tokens(directory: str, step: int | None, stamp: tuple, messages: list[dict]) -> int:
    """How many tokens the conversation renders to (no cut): what the next reply's prompt starts from.
    Raises TokenizerError / ConversationError for an ill-formed conversation."""
    from nanochat.conversation import Conversation

    loaded, _ = model(directory, step, stamp)
    return loaded.tokenizer.chat_template().render(Conversation.parse(list(messages)), max_tokens=2**62).length


def model_context(directory: str, step: int | None, stamp: tuple) -> int:
    return model(directory, step, stamp)[1].context


def append_conversation(path: str, messages: list[dict]) -> int:
    """Add a conversation to a JSONL file the builder and chat_sft read (created if absent; every
    existing line kept); the builder's cached reads of it are cleared. Returns its line number."""
    from nanochat.conversation import Conversation
    from nanochat.conversation_file import ConversationFileError, append_conversation

    if not path or not path.strip():
        raise ConversationFileError("give a file to save the conversation to (e.g. chat.jsonl)")
    line = append_conversation(Path(path.strip()).expanduser(), Conversation.parse(list(messages)))
    conversation_entries.clear()
    conversation_table.clear()
    return line

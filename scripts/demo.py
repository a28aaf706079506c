"""
Build the demo base directory the app shows on a fresh machine: real data, a real tokenizer, real runs.

    python -m scripts.demo                 # builds .demo/ (about 2-3 minutes on 2 CPU cores), then prints a sample
    python -m scripts.demo --profile test  # a tiny version in seconds (what the tests use)

Steps, each skipped when its output already exists (a second run finishes in seconds):
1. the bundled Shakespeare corpus (`data/shakespeare.jsonl.gz`) -> parquet shards in `<base>/base_data/`
   (speeches grouped into documents of up to ~600 characters, row groups of 128 documents; the last
   play, The Winter's Tale, is the last shard = validation);
2. a 2,048-token BPE tokenizer trained on the train shards (`scripts.tok_train`) -> `<base>/tokenizer/`;
3. three CPU runs of `scripts.base_train`, each a real subprocess, with checkpoints every few steps:
   two finished runs of different depth, and one that is SIGKILLed between two checkpoints and then
   continued with `--resume` (two resume segments in its metrics);
4. the registry index `<base>/registry.sqlite` (`registry.scanner.scan_path`).

`build_demo(base_dir, profile="full"|"test", progress=None)` is the one builder the CLI, the tests and
the app's fixtures share. It returns a `DemoResult` with each run's final step, val_bpb and segments and a
text sample from the final model. It does not start the app (`make app` does, after this).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare.jsonl.gz"
DEFAULT_DEMO_DIR = ROOT / ".demo"
MANIFEST = "demo.json"
DOC_CHARS = 600
ROW_GROUP_DOCS = 128
TRAIN_SHARD_DOCS = 2048
SAMPLE_PROMPT = "KING HENRY.\n"

Progress = Callable[[str, int, int], None]  # (stage, done, total)


class DemoError(RuntimeError):
    """The demo cannot be built; one line saying why."""


@dataclass(frozen=True)
class RunSpec:
    tag: str
    depth: int
    steps: int
    save_every: int
    eval_every: int
    kill_after_step: int | None = None  # SIGKILL the first launch once this step has been logged
    lane: int = 0  # runs in different lanes train at the same time, one CPU thread each

    def flags(self, p: DemoProfile) -> list[str]:
        return ["--model-tag", self.tag, "--depth", str(self.depth), "--aspect-ratio", str(p.aspect_ratio),
                "--head-dim", str(p.head_dim), "--max-seq-len", str(p.seq_len), "--window-pattern", "L",
                "--device-batch-size", str(p.device_batch_size), "--total-batch-size", str(p.total_batch_size),
                "--num-iterations", str(self.steps), "--warmup-steps", str(p.warmup_steps),
                "--matrix-lr", str(p.matrix_lr), "--embedding-lr", str(p.embedding_lr),
                "--unembedding-lr", str(p.unembedding_lr), "--scalar-lr", str(p.scalar_lr),
                "--eval-every", str(self.eval_every), "--eval-tokens", str(p.eval_tokens),
                "--save-every", str(self.save_every), "--device", "cpu", "--compile", "off"]


@dataclass(frozen=True)
class DemoProfile:
    name: str
    vocab_size: int
    aspect_ratio: int
    head_dim: int
    seq_len: int
    device_batch_size: int
    total_batch_size: int
    warmup_steps: int
    eval_tokens: int
    # Upstream scales every LR by sqrt(batch / 2**19): at 4,096 tokens per step that is ~1/11, tuned for
    # runs of thousands of steps. The demo has a few hundred, so it asks for 8x (Muon 16x); measured on d2,
    # 100 steps: val_bpb 2.668 at 4x, 2.631 at 8x, 2.612 at 8x with Muon 16x.
    matrix_lr: float
    embedding_lr: float
    unembedding_lr: float
    scalar_lr: float
    runs: tuple[RunSpec, ...]
    final_tag: str  # the run whose sample is shown
    corpus_chars: int | None = None  # None: the whole corpus


PROFILES = {
    "full": DemoProfile(
        name="full", vocab_size=2048, aspect_ratio=32, head_dim=32, seq_len=256, device_batch_size=16,
        total_batch_size=4096, warmup_steps=10, eval_tokens=16384, matrix_lr=0.32, embedding_lr=2.4,
        unembedding_lr=0.064, scalar_lr=2.0,
        runs=(RunSpec("d2", depth=2, steps=150, save_every=50, eval_every=25, lane=1),
              RunSpec("d4-crash", depth=4, steps=150, save_every=30, eval_every=25, kill_after_step=75, lane=1),
              RunSpec("d4", depth=4, steps=250, save_every=50, eval_every=25, lane=0)),
        final_tag="d4"),
    "test": DemoProfile(
        name="test", vocab_size=512, aspect_ratio=32, head_dim=32, seq_len=64, device_batch_size=8,
        total_batch_size=512, warmup_steps=2, eval_tokens=1024, matrix_lr=0.32, embedding_lr=2.4,
        unembedding_lr=0.064, scalar_lr=2.0,
        runs=(RunSpec("d1", depth=1, steps=12, save_every=4, eval_every=4, lane=1),
              RunSpec("d2-crash", depth=2, steps=12, save_every=4, eval_every=4, kill_after_step=6, lane=1),
              RunSpec("d2", depth=2, steps=12, save_every=4, eval_every=4, lane=0)),
        final_tag="d2", corpus_chars=600_000),
}


@dataclass(frozen=True)
class RunResult:
    tag: str
    step: int
    val_bpb: float | None
    segments: int
    checkpoints: tuple[int, ...]
    reused: bool


@dataclass(frozen=True)
class DemoResult:
    base_dir: Path
    profile: str
    runs: tuple[RunResult, ...]
    sample: str
    registry: Path
    wall_s: float
    reused: bool = field(default=False)


# ---------------------------------------------------------------------- data and tokenizer


def corpus_documents(limit_chars: int | None = None) -> list[tuple[str, str]]:
    """(play id, document) pairs: consecutive speeches joined up to DOC_CHARS, in corpus order."""
    docs = []
    total = 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            work = json.loads(line)
            chunk = ""
            for para in _pieces(work["text"]):
                if chunk and len(chunk) + len(para) + 2 > DOC_CHARS:
                    docs.append((work["id"], chunk))
                    chunk = ""
                chunk = f"{chunk}\n\n{para}" if chunk else para
            if chunk:
                docs.append((work["id"], chunk))
            total += len(work["text"])
            if limit_chars and total >= limit_chars:
                break
    return docs


def _pieces(text: str):
    """Paragraphs (speeches), long ones cut at line ends into pieces of at most DOC_CHARS: a document
    longer than a training row would be cropped and its rest thrown away by the best-fit packing."""
    for para in re.split(r"\n\s*\n", text):
        piece = ""
        for line in para.strip().split("\n"):
            if piece and len(piece) + len(line) + 1 > DOC_CHARS:
                yield piece
                piece = ""
            piece = f"{piece}\n{line}" if piece else line
        if piece.strip():
            yield piece


def write_shards(data_dir: Path, limit_chars: int | None) -> list[Path]:
    """Train shards of TRAIN_SHARD_DOCS documents, then the last play alone as the validation shard."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = corpus_documents(limit_chars)
    last_play = docs[-1][0]
    train = [d for play, d in docs if play != last_play]
    val = [d for play, d in docs if play == last_play]
    shards = [train[i:i + TRAIN_SHARD_DOCS] for i in range(0, len(train), TRAIN_SHARD_DOCS)] + [val]
    tmp_dir = data_dir.with_name(data_dir.name + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    for i, shard in enumerate(shards):
        pq.write_table(pa.table({"text": shard}), tmp_dir / f"shard_{i:05d}.parquet", row_group_size=ROW_GROUP_DOCS)
    os.replace(tmp_dir, data_dir)  # all shards appear at once: a half-written data dir is never reused
    return sorted(data_dir.glob("*.parquet"))


# ---------------------------------------------------------------------- runs


def _train_cmd(spec: RunSpec, profile: DemoProfile, resume: bool) -> list[str]:
    return [sys.executable, "-m", "scripts.base_train", *spec.flags(profile), *(["--resume"] if resume else [])]


def _run_training(cmd: list[str], base_dir: Path, label: str, total: int, progress: Progress | None,
                  kill_after_step: int | None = None, threads: int = 1) -> tuple[int, list[str]]:
    """Run one training launch, reporting its steps; SIGKILL it once `kill_after_step` is logged."""
    # One lane per core with its own threads: several OpenMP threads spinning on a busy 2-core machine
    # are up to 50x slower than one (measured), and two lanes keep both cores busy anyway.
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads)}
    env.pop("NANOCHAT_FAULT_KILL_AFTER", None)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    step_re = re.compile(r"^step (\d+)/(\d+)")
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-30:]
        m = step_re.match(line)
        if m:
            step = int(m.group(1))
            if progress:
                progress(label, step + 1, total)
            if kill_after_step is not None and step >= kill_after_step:
                proc.send_signal(signal.SIGKILL)  # a real crash: no handler runs, no checkpoint is written
                break
    proc.stdout.close()
    return proc.wait(), tail


def _complete_steps(run_dir: Path) -> list[int]:
    from nanochat import checkpoint_manager as cm

    if not run_dir.is_dir():
        return []
    return [c.step for c in cm.list_checkpoints(run_dir)
            if c.layout == "upstream" and not any(p.blocks == "load" for p in cm.quick_problems(c))]


def build_run(base_dir: Path, spec: RunSpec, profile: DemoProfile, progress: Progress | None,
              threads: int = 1) -> RunResult:
    run_dir = base_dir / "base_checkpoints" / spec.tag
    steps = _complete_steps(run_dir)
    reused = spec.steps in steps
    if not reused:
        if not steps:
            shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an interrupted build, nothing complete
            if spec.kill_after_step is not None:
                code, tail = _run_training(_train_cmd(spec, profile, False), base_dir, spec.tag, spec.steps, progress,
                                           kill_after_step=spec.kill_after_step, threads=threads)
                if code != -signal.SIGKILL:
                    raise DemoError(f"run {spec.tag} was meant to be killed but exited with {code}: {tail[-1:]}")
                steps = _complete_steps(run_dir)
                if not steps:  # killed before its first checkpoint: nothing to resume, start over
                    shutil.rmtree(run_dir, ignore_errors=True)
        code, tail = _run_training(_train_cmd(spec, profile, bool(steps)), base_dir, spec.tag, spec.steps, progress,
                                   threads=threads)
        if code != 0:
            raise DemoError(f"training {spec.tag} failed (exit {code}):\n" + "\n".join(tail[-8:]))
    return summarize_run(run_dir, reused)


def summarize_run(run_dir: Path, reused: bool) -> RunResult:
    from nanochat import checkpoint_manager as cm

    last = cm.find_last_complete(run_dir)
    meta = cm.read_meta(last)
    segments = set()
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                segments.add(json.loads(line)["segment"])
            except (json.JSONDecodeError, KeyError):
                continue  # a torn last line
    return RunResult(run_dir.name, last.step, meta.get("val_bpb"), len(segments), tuple(_complete_steps(run_dir)),
                     reused)


def build_runs(base: Path, p: DemoProfile, progress: Progress | None) -> tuple[RunResult, ...]:
    """Every run of the profile; lanes train side by side (one per core), runs in a lane one after another."""
    lanes = sorted({spec.lane for spec in p.runs}) if (os.cpu_count() or 1) >= 2 else [0]
    threads = max(1, (os.cpu_count() or 1) // len(lanes))
    lock = threading.Lock()

    def report(stage: str, done: int, total: int) -> None:
        with lock:
            progress(stage, done, total)

    def lane(i: int) -> dict[str, RunResult]:
        mine = [s for s in p.runs if s.lane == i or len(lanes) == 1]
        return {s.tag: build_run(base, s, p, report if progress else None, threads) for s in mine}

    with ThreadPoolExecutor(max_workers=len(lanes)) as pool:
        done: dict[str, RunResult] = {}
        for part in pool.map(lane, lanes):
            done.update(part)
    return tuple(done[s.tag] for s in p.runs)


# ---------------------------------------------------------------------- sample and registry


def sample_text(run_dir: Path, prompt: str = SAMPLE_PROMPT, max_tokens: int = 160, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0) -> str:
    """A seeded sample from the run's last checkpoint (KV-cached decoding, top-k, temperature)."""
    import torch

    from nanochat import checkpoint_manager as cm

    loaded = cm.load_model(run_dir)
    model, tok = loaded.model, loaded.tokenizer
    ids = tok.encode(prompt, prepend="<|bos|>")
    gen = torch.Generator().manual_seed(seed)
    limit = min(len(ids) + max_tokens, model.config.sequence_len)
    cache = model.new_kv_cache(1, limit)
    out: list[int] = []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), kv_cache=cache)[0, -1]
        for _ in range(limit - len(ids)):
            top = torch.topk(logits / temperature, top_k)
            nxt = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)])
            if nxt == tok.get_bos_token_id():
                break
            out.append(nxt)
            logits = model(torch.tensor([[nxt]]), kv_cache=cache)[0, -1]
    return prompt + tok.decode(out)


def index_registry(base_dir: Path, progress: Progress | None = None):
    """Index every run of the demo into <base>/registry.sqlite (the registry's own scanner)."""
    from registry import open_store, scanner

    store = open_store(str(base_dir / "registry.sqlite"))
    try:
        return scanner.scan_path(store, base_dir,
                                 progress=(lambda done, total, _msg: progress("registry", done, max(total, 1)))
                                 if progress else None)
    finally:
        store.close()


# ---------------------------------------------------------------------- the builder


def build_demo(base_dir: str | os.PathLike = DEFAULT_DEMO_DIR, profile: str = "full",
               progress: Progress | None = None) -> DemoResult:
    from nanochat.tokenizer import Tokenizer, TokenizerError

    if profile not in PROFILES:
        raise DemoError(f"unknown demo profile {profile!r} (choose {', '.join(PROFILES)})")
    p = PROFILES[profile]
    t0 = time.time()
    base = Path(base_dir).resolve()
    base.mkdir(parents=True, exist_ok=True)
    manifest = base / MANIFEST
    if manifest.exists():
        built = json.loads(manifest.read_text(encoding="utf-8")).get("profile")
        if built != profile:
            raise DemoError(f"{base} holds the {built!r} demo, not {profile!r}; delete it or choose another directory")
    else:
        manifest.write_text(json.dumps({"profile": profile, "version": 1}) + "\n", encoding="utf-8")

    data_dir = base / "base_data"
    reused = data_dir.is_dir() and len(list(data_dir.glob("*.parquet"))) >= 2
    if not reused:
        if progress:
            progress("data", 0, 1)
        write_shards(data_dir, p.corpus_chars)
    if progress:
        progress("data", 1, 1)

    tok_dir = base / "tokenizer"
    try:
        tok = Tokenizer.from_directory(tok_dir)
        if tok.get_vocab_size() != p.vocab_size:
            raise DemoError(f"{tok_dir} has a {tok.get_vocab_size()}-token tokenizer, the {profile} demo needs "
                            f"{p.vocab_size}; delete {base} to rebuild")
    except TokenizerError:
        reused = False
        if progress:
            progress("tokenizer", 0, 1)
        from scripts.tok_train import train_tokenizer

        train_tokenizer(base, p.vocab_size, max_chars=10**9, doc_cap=10_000)
    if progress:
        progress("tokenizer", 1, 1)

    runs = build_runs(base, p, progress)
    reused = reused and all(r.reused for r in runs)
    index_registry(base, progress)
    sample = sample_text(base / "base_checkpoints" / p.final_tag)
    return DemoResult(base, profile, runs, sample, base / "registry.sqlite", time.time() - t0, reused)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description="Build the demo runs and registry.")
    parser.add_argument("--base-dir", type=Path, default=DEFAULT_DEMO_DIR, help="where to build (default .demo/)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full", help="full demo or the tiny test one")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{stage:>10}", unit="step" if total > 1 else "",
                                     bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]", leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    try:
        result = build_demo(args.base_dir, args.profile, progress)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print()
    for r in result.runs:
        bpb = "n/a" if r.val_bpb is None else f"{r.val_bpb:.4f}"
        print(f"run {r.tag:<10} step {r.step:>4}  val_bpb {bpb}  segments {r.segments}  checkpoints {list(r.checkpoints)}"
              + ("  (reused)" if r.reused else ""))
    print(f"registry: {result.registry}")
    print(f"\nsample from {PROFILES[args.profile].final_tag}:\n{result.sample}\n")
    print(f"demo ready in {result.wall_s:.1f}s ({'reused' if result.reused else 'built'}) at {result.base_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

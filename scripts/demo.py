"""
Build the demo base directory the app shows on a fresh machine: real data, a real tokenizer, real runs.

    python -m scripts.demo                 # builds .demo/ (README: measured times), then prints a sample
    python -m scripts.demo --profile test  # a tiny version in about a minute (what the tests use)

Steps, each skipped when its output already exists (a second run finishes in seconds):
1. the bundled Shakespeare corpus (`data/shakespeare.jsonl.gz`) -> parquet shards in `<base>/base_data/`
   (speeches grouped into documents of up to ~600 characters, row groups of 128 documents; the last
   play, The Winter's Tale, is the last shard = validation);
2. a 2,048-token BPE tokenizer trained on the train shards (`scripts.tok_train`) -> `<base>/tokenizer/`,
   and chat conversations made from the plays' dialogue (`scripts/play_conversations.py`: a speech and its
   reply, with the speakers' names) that fit an SFT row -> `<base>/conversations/plays.jsonl` and
   `plays_val.jsonl` (the last play), which the Conversation builder opens first (made while step 3 runs);
3. three CPU runs of `scripts.base_train`, each a real subprocess, with checkpoints every few steps:
   a finished run; one SIGKILLed between two checkpoints and continued with `--resume` to its end (two
   resume segments in its metrics); and a shallower one SIGKILLed between two checkpoints and left so (a
   crash waiting to be resumed: the Resume page's first case; its files are dated an hour back, so the
   registry calls it stopped, not training);
4. the chat model: the final run fine-tuned with `scripts.chat_sft` on the play conversations ->
   `<base>/chatsft_checkpoints/<tag>/`, in the final run's lane right after it;
5. the registry index `<base>/registry.sqlite` (`registry.scanner.scan_path`).
The runs are the time: launches start importing ahead of their turn (scripts/warm_launch.py), the conversations
are made beside the first runs, and the SFT run and the sample take both cores once the other lane is done
(README: where the time goes).

`build_demo(base_dir, profile="full"|"test", progress=None)` is the one builder the CLI, the tests and
the app's fixtures share; progress(stage, done, total) also reports stage "total": the training work
done and planned, in FLOPs (the CLI turns it into an ETA). It returns a `DemoResult` with each run's
final step, val_bpb and segments, the SFT run's, and a text sample from the final base model. It does not start the
app (`make app` does, after this).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from scripts.warm_launch import Launches

ROOT = Path(__file__).resolve().parent.parent
CORPUS = ROOT / "data" / "shakespeare.jsonl.gz"
DEFAULT_DEMO_DIR = ROOT / ".demo"
MANIFEST = "demo.json"
DOC_CHARS = 600
ROW_GROUP_DOCS = 128
TRAIN_SHARD_DOCS = 2048
SAMPLE_PROMPT = "KING HENRY.\n"
BASE_TRAIN, CHAT_SFT = "scripts.base_train", "scripts.chat_sft"
SFT_WARM_STEPS = 10  # the SFT launch starts importing this many steps before its base run ends (~2 s of a core)

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
    resume_after_kill: bool = True  # False: leave the killed run as the crash left it
    lane: int = 0  # runs in different lanes train at the same time, one CPU thread each

    @property
    def left_killed(self) -> bool:
        return self.kill_after_step is not None and not self.resume_after_kill

    @property
    def final_step(self) -> int:
        """The newest checkpoint the finished build has: the target, or the last save before the kill."""
        if self.left_killed:
            return self.kill_after_step // self.save_every * self.save_every
        return self.steps

    def steps_to_train(self, have: int = 0) -> int:
        """Optimizer steps still to run, from `have` (the newest complete checkpoint already there)."""
        if have >= self.final_step:
            return 0
        first = (self.kill_after_step or 0) + 1  # the killed launch, from scratch
        if self.left_killed:
            return first  # an unfinished kill starts over
        if self.kill_after_step is None or have:
            return self.steps - have  # --resume from `have` to the end
        return first + self.steps - self.kill_after_step // self.save_every * self.save_every

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
class SftSpec:
    """The demo's chat model: base run `tag` fine-tuned with scripts.chat_sft on the play conversations
    (<base>/conversations/), written to chatsft_checkpoints/<tag>/. Batch, sequence length and LRs are inherited
    from the base run, as upstream's chat_sft does."""

    tag: str
    steps: int
    save_every: int
    eval_every: int
    # The demo's base LRs are 8-16x upstream's (see DemoProfile). Measured on d4 (busy machine): at upstream's 0.8
    # val bpb on the held-out play went 2.28 -> 3.06 by step 15 (SFT undid the base run); at 0.25, 2.40 after 30;
    # at 0.1, 2.22 after 20 steps, and the model answers "NAME: ..." and ends its turn (7 of 8 samples).
    init_lr_frac: float = 0.1

    @property
    def label(self) -> str:
        return f"sft {self.tag}"

    def steps_to_train(self, have: list[int]) -> int:
        return 0 if self.steps in have else self.steps - max(have, default=0)

    def args(self, p: DemoProfile, base: Path, resume: bool) -> list[str]:
        from nanochat.conversation_file import CONVERSATIONS_DIR
        from scripts.play_conversations import TRAIN_FILE, VAL_FILE

        folder = base / CONVERSATIONS_DIR
        return ["--model-tag", self.tag, "--conversations", str(folder / TRAIN_FILE),
                "--val-conversations", str(folder / VAL_FILE), "--num-iterations", str(self.steps),
                "--init-lr-frac", str(self.init_lr_frac), "--eval-every", str(self.eval_every),
                "--eval-tokens", str(p.eval_tokens), "--save-every", str(self.save_every), "--device", "cpu",
                "--compile", "off", *(["--resume"] if resume else [])]


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
    sft: SftSpec | None = None  # the chat model, fine-tuned from a run of this profile


PROFILES = {
    "full": DemoProfile(
        name="full", vocab_size=2048, aspect_ratio=32, head_dim=32, seq_len=256, device_batch_size=16,
        # eval_tokens: 32 rows of the validation play. 16,384 cost d4 ~5% of its run (11 evals, each ~1.4 steps)
        total_batch_size=4096, warmup_steps=10, eval_tokens=8192, matrix_lr=0.32, embedding_lr=2.4,
        unembedding_lr=0.064, scalar_lr=2.0,
        runs=(RunSpec("d2", depth=2, steps=200, save_every=50, eval_every=25, kill_after_step=165, resume_after_kill=False,
                      lane=1),
              RunSpec("d4-crash", depth=4, steps=150, save_every=30, eval_every=25, kill_after_step=75, lane=1),
              RunSpec("d4", depth=4, steps=250, save_every=50, eval_every=25, lane=0)),
        final_tag="d4", sft=SftSpec("d4", steps=20, save_every=10, eval_every=10)),
    "test": DemoProfile(
        name="test", vocab_size=512, aspect_ratio=32, head_dim=32, seq_len=64, device_batch_size=8,
        total_batch_size=512, warmup_steps=2, eval_tokens=1024, matrix_lr=0.32, embedding_lr=2.4,
        unembedding_lr=0.064, scalar_lr=2.0,
        runs=(RunSpec("d1", depth=1, steps=16, save_every=4, eval_every=4, kill_after_step=13, resume_after_kill=False,
                      lane=1),
              RunSpec("d2-crash", depth=2, steps=12, save_every=4, eval_every=4, kill_after_step=6, lane=1),
              RunSpec("d2", depth=2, steps=12, save_every=4, eval_every=4, lane=0)),
        final_tag="d2", corpus_chars=600_000, sft=SftSpec("d2", steps=4, save_every=2, eval_every=2)),
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
    sft: RunResult | None = None  # the chat model (chatsft_checkpoints/<tag>)


# ---------------------------------------------------------------------- data and tokenizer


def corpus_works(limit_chars: int | None = None) -> list[tuple[str, str]]:
    """(work id, text) of the corpus in order, up to the work that reaches limit_chars (None: all of it).
    The last one is the demo's validation work (its shard, its conversations)."""
    works = []
    total = 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            work = json.loads(line)
            works.append((work["id"], work["text"]))
            total += len(work["text"])
            if limit_chars and total >= limit_chars:
                break
    return works


def corpus_documents(limit_chars: int | None = None) -> list[tuple[str, str]]:
    """(play id, document) pairs: consecutive speeches joined up to DOC_CHARS, in corpus order."""
    docs = []
    for work_id, text in corpus_works(limit_chars):
        chunk = ""
        for para in _pieces(text):
            if chunk and len(chunk) + len(para) + 2 > DOC_CHARS:
                docs.append((work_id, chunk))
                chunk = ""
            chunk = f"{chunk}\n\n{para}" if chunk else para
        if chunk:
            docs.append((work_id, chunk))
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


def _train_args(spec: RunSpec, profile: DemoProfile, resume: bool) -> list[str]:
    return [*spec.flags(profile), *(["--resume"] if resume else [])]


def _run_training(launches: Launches, module: str, args: list[str], label: str, total: int, progress: Progress | None,
                  kill_after_step: int | None = None, threads: int = 1) -> tuple[int, list[str]]:
    """Run one training launch (`python -m module args`, warm if it was started ahead), reporting its steps;
    SIGKILL it once `kill_after_step` is logged."""
    proc = launches.take(module, args, threads)
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


def _leave_killed(run_dir: Path, age_s: float = 3600.0) -> None:
    """Date the killed run's files back: the registry calls a run whose files changed in the last minutes
    `training`; the demo's crash is one found later, a `stopped` run waiting to be resumed."""
    when = time.time() - age_s
    for f in run_dir.iterdir():
        os.utime(f, (when, when))


def build_run(base_dir: Path, spec: RunSpec, profile: DemoProfile, progress: Progress | None, threads: int,
              launches: Launches) -> RunResult:
    run_dir = base_dir / "base_checkpoints" / spec.tag
    steps = _complete_steps(run_dir)
    reused = spec.final_step in steps
    if spec.left_killed:
        if reused:  # a demo built before this run was left killed holds it finished: build it again
            from nanochat import checkpoint_manager as cm

            last = next(c for c in cm.list_checkpoints(run_dir) if c.step == spec.final_step)
            reused = cm.read_meta(last).get("num_iterations") == spec.steps
        if not reused:
            shutil.rmtree(run_dir, ignore_errors=True)  # a kill that never happened: start over
            code, tail = _run_training(launches, BASE_TRAIN, _train_args(spec, profile, False), spec.tag, spec.steps,
                                       progress, kill_after_step=spec.kill_after_step, threads=threads)
            if code != -signal.SIGKILL or spec.final_step not in _complete_steps(run_dir):
                raise DemoError(f"run {spec.tag} was meant to be killed after step {spec.final_step} but exited with "
                                f"{code}: {tail[-1:]}")
            _leave_killed(run_dir)
        return summarize_run(run_dir, reused)
    if not reused:
        if not steps:
            shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an interrupted build, nothing complete
            if spec.kill_after_step is not None:
                code, tail = _run_training(launches, BASE_TRAIN, _train_args(spec, profile, False), spec.tag,
                                           spec.steps, progress, kill_after_step=spec.kill_after_step, threads=threads)
                if code != -signal.SIGKILL:
                    raise DemoError(f"run {spec.tag} was meant to be killed but exited with {code}: {tail[-1:]}")
                steps = _complete_steps(run_dir)
                if not steps:  # killed before its first checkpoint: nothing to resume, start over
                    shutil.rmtree(run_dir, ignore_errors=True)
        code, tail = _run_training(launches, BASE_TRAIN, _train_args(spec, profile, bool(steps)), spec.tag, spec.steps,
                                   progress, threads=threads)
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


def build_sft(base_dir: Path, spec: SftSpec, profile: DemoProfile, progress: Progress | None, threads: int,
              launches: Launches) -> RunResult:
    """The chat model: scripts.chat_sft on the play conversations, from the base run's last checkpoint (resumed
    when an interrupted build left a checkpoint of it)."""
    run_dir = base_dir / "chatsft_checkpoints" / spec.tag
    steps = _complete_steps(run_dir)
    reused = spec.steps in steps
    if not reused:
        if not steps:
            shutil.rmtree(run_dir, ignore_errors=True)  # leftovers of an interrupted build, nothing complete
        code, tail = _run_training(launches, CHAT_SFT, spec.args(profile, base_dir, bool(steps)), spec.label,
                                   spec.steps, progress, threads=threads)
        if code != 0:
            raise DemoError(f"fine-tuning {spec.tag} failed (exit {code}):\n" + "\n".join(tail[-8:]))
    return summarize_run(run_dir, reused)


def step_flops(spec: RunSpec, p: DemoProfile) -> int:
    """Training FLOPs of one optimizer step of the run (the unit of the build's ETA)."""
    from nanochat import model_config as mc

    cfg = mc.current_config(spec.depth, p.aspect_ratio, p.head_dim, p.seq_len, p.vocab_size, "L")
    return mc.flops_per_token(cfg) * p.total_batch_size


@dataclass(frozen=True)
class Trained:
    runs: tuple[RunResult, ...]
    sft: RunResult | None
    sample: str


def lanes_of(p: DemoProfile) -> tuple[list[int], int]:
    """The lanes that train side by side (one per core; one lane on a 1-core machine) and torch threads per lane."""
    lanes = sorted({spec.lane for spec in p.runs}) if (os.cpu_count() or 1) >= 2 else [0]
    return lanes, max(1, (os.cpu_count() or 1) // len(lanes))


def build_runs(base: Path, p: DemoProfile, progress: Progress | None, launches: Launches,
               prepare: Callable[[Progress], None] = lambda report: None) -> Trained:
    """Every run of the profile, then its SFT run and the sample. Lanes train side by side (one per core), runs in
    a lane one after another; the SFT run follows its base run in that run's lane, then the sample of the final
    run is drawn. The first launch of each lane starts importing at once (while the shards and tokenizer are made:
    see `warm_started`), the SFT launch a few steps before its base run ends. The SFT run and the sample come last
    on the longest path while the other lanes are done: then they take every core's thread (measured: d4's step
    on two threads alone takes half the time of one thread beside the other lane). `prepare` (what only the SFT
    run needs: its conversations) runs beside the first runs, off the lanes' path. Reports each run's steps, and
    stage "total": training FLOPs done of those planned."""
    lanes, threads = lanes_of(p)
    lock = threading.Lock()
    unit = {spec.tag: step_flops(spec, p) for spec in p.runs}
    planned = sum(unit[spec.tag] * spec.steps_to_train(max(_complete_steps(base / "base_checkpoints" / spec.tag), default=0))
                  for spec in p.runs)
    if p.sft:
        unit[p.sft.label] = unit[p.sft.tag]  # the same model and tokens per step
        planned += unit[p.sft.label] * p.sft.steps_to_train(_complete_steps(base / "chatsft_checkpoints" / p.sft.tag))
    work = {"done": 0}
    sft_fresh = p.sft is not None and not (base / "chatsft_checkpoints" / p.sft.tag).exists()
    lanes_done: set[int] = set()
    sft_threads: list[int] = []  # decided once (when its launch starts ahead, or at its turn)

    def spare_threads(mine: int) -> int:
        """Threads for the work after lane `mine`'s runs: every core's once the other lanes are done."""
        return (os.cpu_count() or 1) if lanes_done >= set(lanes) - {mine} else threads

    def report(stage: str, done: int, total: int) -> None:
        with lock:
            if sft_fresh and stage == p.sft.tag and done == total - SFT_WARM_STEPS and not sft_threads:
                sft_threads.append(spare_threads(lane_of[p.sft.tag]))
                launches.start(CHAT_SFT, p.sft.args(p, base, resume=False), sft_threads[0])
            if progress:
                progress(stage, done, total)
            if stage in unit and planned and progress:  # one call per logged step
                work["done"] = min(planned, work["done"] + unit[stage])
                progress("total", work["done"], planned)

    lane_of = {s.tag: (s.lane if len(lanes) > 1 else lanes[0]) for s in p.runs}

    def lane(i: int, prepared: Future) -> tuple[dict[str, RunResult], RunResult | None, str | None]:
        done = {s.tag: build_run(base, s, p, report, threads, launches) for s in p.runs if lane_of[s.tag] == i}
        with lock:
            lanes_done.add(i)
        sft = sample = None
        if p.sft and p.sft.tag in done:
            prepared.result()
            with lock:
                if not sft_threads:
                    sft_threads.append(spare_threads(i))
            sft = build_sft(base, p.sft, p, report, sft_threads[0], launches)
        if p.final_tag in done:
            sample = sample_text(base / "base_checkpoints" / p.final_tag, threads=spare_threads(i))
        return done, sft, sample

    with ThreadPoolExecutor(max_workers=len(lanes) + 1) as pool:
        prepared = pool.submit(prepare, report)
        parts = list(pool.map(lambda i: lane(i, prepared), lanes))
        prepared.result()
    runs = {tag: r for done, _, _ in parts for tag, r in done.items()}
    sft = next((s for _, s, _ in parts if s is not None), None)
    sample = next(x for _, _, x in parts if x is not None)
    return Trained(tuple(runs[s.tag] for s in p.runs), sft, sample)


def warm_started(base: Path, p: DemoProfile) -> Launches:
    """Launches: the first of each lane started ahead when it will be a fresh start (nothing of that run yet), as
    build_run would start it. A wrong guess costs an idle import; the launch that is needed is then started anew."""
    lanes, threads = lanes_of(p)
    launches = Launches(base)
    for i in lanes:
        first = next(s for s in p.runs if s.lane == i or len(lanes) == 1)
        if not (base / "base_checkpoints" / first.tag).exists():
            launches.start(BASE_TRAIN, _train_args(first, p, resume=False), threads)
    return launches


# ---------------------------------------------------------------------- sample and registry


def sample_text(run_dir: Path, prompt: str = SAMPLE_PROMPT, max_tokens: int = 160, temperature: float = 0.8,
                top_k: int = 40, seed: int = 0, threads: int | None = None) -> str:
    """A seeded sample from the run's last checkpoint (KV-cached decoding, top-k, temperature), on `threads`
    torch threads (default: torch's; a training lane may still be running on another core)."""
    import torch

    from nanochat import checkpoint_manager as cm

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        return _sample(cm.load_model(run_dir), prompt, max_tokens, temperature, top_k, seed)
    finally:
        torch.set_num_threads(before)


def _sample(loaded, prompt: str, max_tokens: int, temperature: float, top_k: int, seed: int) -> str:
    import torch

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
    if profile not in PROFILES:
        raise DemoError(f"unknown demo profile {profile!r} (choose {', '.join(PROFILES)})")
    p = PROFILES[profile]
    t0 = time.time()
    base = Path(base_dir).resolve()
    if base.exists() and not base.is_dir():
        raise DemoError(f"{base} is a file, not a folder: give --base-dir a folder (it is created if missing)")
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DemoError(f"cannot create {base}: {e.strerror}") from None
    if not os.access(base, os.W_OK):
        raise DemoError(f"{base} is not writable: give --base-dir a folder you can write")
    manifest = base / MANIFEST
    if manifest.exists():
        built = json.loads(manifest.read_text(encoding="utf-8")).get("profile")
        if built != profile:
            raise DemoError(f"{base} holds the {built!r} demo, not {profile!r}; delete it or choose another directory")
    else:
        manifest.write_text(json.dumps({"profile": profile, "version": 1}) + "\n", encoding="utf-8")

    launches = warm_started(base, p)  # their imports overlap the data and tokenizer below
    try:
        return _build(base, p, progress, launches, t0)
    finally:
        launches.cancel_all()


def _build(base: Path, p: DemoProfile, progress: Progress | None, launches: Launches, t0: float) -> DemoResult:
    from nanochat.conversation_file import CONVERSATIONS_DIR
    from nanochat.tokenizer import Tokenizer, TokenizerError
    from scripts import play_conversations

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
            raise DemoError(f"{tok_dir} has a {tok.get_vocab_size()}-token tokenizer, the {p.name} demo needs "
                            f"{p.vocab_size}; delete {base} to rebuild")
    except TokenizerError:
        reused = False
        if progress:
            progress("tokenizer", 0, 1)
        from scripts.tok_train import train_tokenizer

        train_tokenizer(base, p.vocab_size, max_chars=10**9, doc_cap=10_000)
        tok = Tokenizer.from_directory(tok_dir)
    if progress:
        progress("tokenizer", 1, 1)

    conv_dir = base / CONVERSATIONS_DIR
    chats_needed = not (conv_dir / play_conversations.TRAIN_FILE).is_file()  # written last: present means both whole
    reused = reused and not chats_needed

    def make_conversations(report: Progress) -> None:
        if chats_needed:
            report("chats", 0, 1)
            # conversations that fit an SFT row of the demo's sequence length, so the SFT loader can pack every one
            play_conversations.write_play_conversations(conv_dir, corpus_works(p.corpus_chars), tok.chat_template(),
                                                        p.seq_len + 1)
        report("chats", 1, 1)

    trained = build_runs(base, p, progress, launches, make_conversations)
    reused = reused and all(r.reused for r in trained.runs) and (trained.sft is None or trained.sft.reused)
    index_registry(base, progress)
    return DemoResult(base, p.name, trained.runs, trained.sample, base / "registry.sqlite", time.time() - t0, reused,
                      trained.sft)


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
            # "total": every run's training FLOPs, so its ETA (from the average rate so far) covers all lanes
            fmt = ("{desc} {bar} {percentage:3.0f}% [{elapsed} so far, about {remaining} left]" if stage == "total"
                   else "{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}]")
            bar = bars[stage] = tqdm(total=total, desc=f"{'all runs' if stage == 'total' else stage:>10}",
                                     bar_format=fmt, leave=True)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()

    if not (args.base_dir / MANIFEST).exists():
        print(f"Building the {args.profile} demo in {args.base_dir} (first run only; the README says how long it takes "
              "and where the time goes). Progress and an ETA follow.", flush=True)

    try:
        result = build_demo(args.base_dir, args.profile, progress)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the disk refused a write midway (full, read-only, permissions): one line, not a traceback
        print(f"error: cannot build the demo in {args.base_dir}: {e.strerror or e}"
              + (f" ({e.filename})" if e.filename else ""), file=sys.stderr)
        return 1
    finally:
        for bar in bars.values():  # the killed run's bar stops short of its total
            bar.close()
    print()
    for kind, r in [*(("run", r) for r in result.runs), *([("sft", result.sft)] if result.sft else [])]:
        bpb = "n/a" if r.val_bpb is None else f"{r.val_bpb:.4f}"
        print(f"{kind} {r.tag:<10} step {r.step:>4}  val_bpb {bpb}  segments {r.segments}  checkpoints {list(r.checkpoints)}"
              + ("  (reused)" if r.reused else ""))
    print(f"registry: {result.registry}")
    print(f"\nsample from {PROFILES[args.profile].final_tag}:\n{result.sample}\n")
    print(f"demo ready in {result.wall_s:.1f}s ({'reused' if result.reused else 'built'}) at {result.base_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

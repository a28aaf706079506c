"""
Generation parameter explorer: how temperature, top-k, top-p and min-p change what a checkpoint says.

A command-line front end over `nanochat.engine.Engine` (the same engine as the app's Generate and
Compare pages). It loads a checkpoint, renders the prompt (as a chat turn for SFT/RL checkpoints),
and prints one generation (optionally with per-step probabilities), a comparison of settings (all
rows in ONE batched engine call), an interactive session, or the whole trace as JSON.

It parses arguments, calls the engine and formats; it does no sampling math of its own. Named
errors from the checkpoint manager, the tokenizer and the engine become one line on stderr and exit
status 1; argument errors exit 2.

    python -m tools.generation_explorer --checkpoint PATH --prompt "To be" --temperature 0 --show-probs
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (python tools/generation_explorer.py) as well as with -m
    sys.path.insert(0, str(ROOT))

DEFAULT_TEMPS = [0.1, 0.5, 0.9, 1.2, 1.5]
DEFAULT_TOPKS = [10, 50, 100, None]
DEFAULT_TOPPS = [0.5, 0.8, 0.9, 0.95, 1.0]
COMPARE_FLAGS = {"compare_temp": "temperature", "compare_topk": "top_k", "compare_topp": "top_p"}
VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"})
HELP = """commands:
  PROMPT                generate from PROMPT with the current settings
  gen PROMPT            the same, for a prompt that starts with a command word
  temp X                temperature (0 = greedy)
  topk K|none           top-k filter
  topp P                top-p (nucleus) filter, in (0, 1]
  minp P                min-p filter, in [0, 1)
  seed N                random seed
  tokens N              maximum new tokens
  probs                 toggle per-step probabilities
  compare-temp PROMPT   compare temperatures 0.1 0.5 0.9 1.2 1.5
  compare-topk PROMPT   compare top-k 10 50 100 none
  compare-topp PROMPT   compare top-p 0.5 0.8 0.9 0.95 1
  settings              show the current settings
  chat                  multi-turn chat: every line is your turn (see CHAT_HELP)
  help                  this list
  quit                  leave (also exit, q, Ctrl-D, Ctrl-C)"""
CHAT_HELP = """chat mode: every line is your turn; the model answers with the tool loop (the calculator). Commands start with /:
  /reset                start a new conversation
  /undo                 remove the last exchange (your turn and its reply)
  /history              print the conversation so far
  /save FILE            add the conversation as a line of a JSONL conversation file (created if absent)
  /end                  leave chat mode
  /COMMAND              any other command, e.g. /temp 0.5, /probs, /quit"""


class UsageError(Exception):
    """An argument or interactive command that cannot be understood."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2 (argparse's usual block is several lines)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def top_k_value(text: str) -> int | None:
    if text.strip().lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="generation_explorer", description="Explore how sampling settings change a checkpoint's output.")
    ap.add_argument("--checkpoint", required=True, help="run directory (its newest step passing the quick check; skipped ones are named) "
                    "or one model_NNNNNN.pt / checkpoint.pt")
    ap.add_argument("--step", type=int, help="use this step of the run directory instead of the newest usable one")
    ap.add_argument("--prompt", help="the prompt text (wrapped as a chat turn for SFT/RL checkpoints)")
    ap.add_argument("--temperature", type=float, default=0.9, help="sampling temperature; 0 = greedy (default 0.9)")
    ap.add_argument("--top-k", type=top_k_value, default=None, help="keep the K most likely tokens; 'none' = off (default)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep the most likely tokens up to mass P; 1 = off (default)")
    ap.add_argument("--min-p", type=float, default=0.0, help="keep tokens at least P x the top token's probability; 0 = off (default)")
    ap.add_argument("--seed", type=int, default=42, help="random seed; sample i of a comparison uses seed+i (default 42)")
    ap.add_argument("--max-tokens", type=int, default=50, help="maximum new tokens per row (default 50)")
    ap.add_argument("--num-alternatives", type=int, default=5, help="alternatives shown per step with --show-probs / --json (default 5)")
    ap.add_argument("--show-probs", action="store_true", help="print each step's token, probability, alternatives and entropy")
    ap.add_argument("--watch", type=int, nargs="+", default=[], metavar="ID", help="token ids whose rank and probability are traced")
    ap.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                    help="wrap the prompt as a chat turn (default: only for SFT/RL checkpoints)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--compare-temp", type=float, nargs="*", metavar="T",
                       help="compare temperatures (default 0.1 0.5 0.9 1.2 1.5), --num-samples each, in one batch")
    group.add_argument("--compare-topk", type=top_k_value, nargs="*", metavar="K",
                       help="compare top-k values (default 10 50 100 none) at --temperature, --num-samples each")
    group.add_argument("--compare-topp", type=float, nargs="*", metavar="P",
                       help="compare top-p values (default 0.5 0.8 0.9 0.95 1) at --temperature, --num-samples each")
    group.add_argument("--interactive", "-i", action="store_true", help="interactive session (type 'help' there)")
    ap.add_argument("--num-samples", type=int, default=3, help="samples per setting in a comparison (default 3)")
    ap.add_argument("--json", action="store_true", help="print the result and its full trace as one JSON object")
    ap.add_argument("--device", default="cpu", help="torch device: cpu (default), or cuda / cuda:N when available")
    return ap


# ---------------------------------------------------------------------- formatting


def visible(text: str) -> str:
    """Whitespace made visible: · space, ↵ newline, ⇥ tab, ␍ carriage return."""
    return text.translate(VISIBLE)


class Explorer:
    """The loaded checkpoint, its engine and the current settings; prints what the engine returns."""

    def __init__(self, loaded, engine, args, out=None):
        self.loaded, self.engine, self.out = loaded, engine, out or sys.stdout
        self.chat = args.chat if args.chat is not None else loaded.phase in ("sft", "rl")
        self.max_tokens = args.max_tokens
        self.num_alternatives = args.num_alternatives
        self.num_samples = args.num_samples
        self.show_probs = args.show_probs
        self.watch = tuple(args.watch)
        self.settings = settings_from_args(args).validate()
        self.chatting = False  # chat mode: lines are user turns of self.conversation
        self.conversation: list[dict] = []

    def print(self, *parts):
        print(*parts, file=self.out, flush=True)

    def token_text(self, token_id: int) -> str:
        return self.engine.tokenizer.decode([token_id])

    def trace_options(self):
        from nanochat.sampling import TraceOptions

        return TraceOptions(top_n=self.num_alternatives, watch=self.watch)

    def header(self) -> None:
        ck = self.loaded.checkpoint
        self.print(f"checkpoint: {ck.model} (step {ck.step}, {self.loaded.phase}, {self.loaded.tag})"
                   f"{'; prompts are chat turns' if self.chat else ''}")

    # -------------------------------------------------------------- running

    def rows_for(self, mode: str, values: list) -> list:
        from dataclasses import replace

        if mode == "generate":
            return [self.settings]
        field = COMPARE_FLAGS[mode.replace("-", "_")]
        return [replace(self.settings, **{field: v}, seed=self.settings.seed + i)
                for v in values for i in range(self.num_samples)]

    def run(self, mode: str, prompt: str, values: list | None = None):
        prompt_ids = self.engine.encode(prompt, chat=self.chat)
        rows = self.rows_for(mode, values or [])
        results = self.engine.generate(prompt_ids, rows, self.max_tokens, trace=self.trace_options())
        return prompt_ids, results

    def as_json(self, mode: str, prompt: str, prompt_ids: list[int], results) -> dict:
        ck = self.loaded.checkpoint
        texts: dict[int, str] = {}

        def text(t: int) -> str:  # decoded once per distinct token, after generation
            if t not in texts:
                texts[t] = self.token_text(t)
            return texts[t]

        rows = []
        for r in results:
            steps = [{"step": s.step, "token_id": s.token_id, "token": text(s.token_id), "model_prob": s.model_prob,
                      "sampled_prob": s.sampled_prob, "rank": s.rank, "forced": s.forced, "entropy_nats": s.entropy,
                      "alternatives": [{"token_id": a.token_id, "token": text(a.token_id), "model_prob": a.model_prob,
                                        "sampled_prob": a.sampled_prob, "kept": a.kept} for a in s.alternatives],
                      "watched": [{"token_id": w.token_id, "token": text(w.token_id), "rank": w.rank,
                                   "model_prob": w.model_prob} for w in s.watched]}
                     for s in r.trace]
            rows.append({"row": r.row, "settings": r.settings.as_dict(), "token_ids": list(r.token_ids),
                         "text": r.text, "finish_reason": r.finish_reason, "steps": steps})
        return {"checkpoint": {"path": str(ck.model), "step": ck.step, "phase": self.loaded.phase, "tag": self.loaded.tag},
                "mode": mode, "prompt": prompt, "chat": self.chat, "prompt_token_ids": list(prompt_ids),
                "max_tokens": self.max_tokens, "rows": rows}

    # -------------------------------------------------------------- text output

    def print_generation(self, prompt: str, prompt_ids: list[int], result) -> None:
        self.print(f'prompt: "{prompt}" ({len(prompt_ids)} tokens)')
        self.print(f"settings: {self.settings.describe()}, max {self.max_tokens} tokens")
        if self.show_probs:
            self.print("")
            for s in result.trace:
                self.print_step(s)
        self.print(f"continuation ({len(result.token_ids)} tokens, finished: {result.finish_reason}):")
        self.print(result.text)

    def print_step(self, s) -> None:
        tag = " forced" if s.forced else ""
        self.print(f'step {s.step + 1}: [{s.token_id}] "{visible(self.token_text(s.token_id))}" p={s.model_prob:.4f} '
                   f"sampled-from p={s.sampled_prob:.4f} rank {s.rank}{tag}  entropy {s.entropy:.3f} nats")
        for i, a in enumerate(s.alternatives, 1):
            mark = "<- sampled" if a.token_id == s.token_id else ("" if a.kept else "(filtered out)")
            self.print(f'   {i:2d}. [{a.token_id:5d}] {visible(self.token_text(a.token_id))!s:<14} '
                       f"p={a.model_prob:.4f} sampled-from p={a.sampled_prob:.4f} {mark}".rstrip())
        for w in s.watched:
            self.print(f'   watch [{w.token_id}] "{visible(self.token_text(w.token_id))}" rank {w.rank} p={w.model_prob:.4f}')

    def print_comparison(self, mode: str, prompt: str, results) -> None:
        field = COMPARE_FLAGS[mode.replace("-", "_")]
        self.print(f'{field} comparison, prompt "{prompt}": {len(results)} rows in one batch, '
                   f"{self.num_samples} per setting, max {self.max_tokens} tokens")
        if field != "temperature" and self.settings.greedy:
            self.print(f"note: temperature 0 is greedy, so {field} changes nothing; set a temperature above 0")
        shown = None
        for r in results:
            value = getattr(r.settings, field)
            if value != shown:
                shown = value
                self.print(f"--- {r.settings.describe(seed=False)}")
            self.print(f"  seed {r.settings.seed} [{r.finish_reason}, {len(r.token_ids)} tokens]: {visible(r.text)}")

    def execute(self, mode: str, prompt: str, values: list | None, as_json: bool, header: bool = False) -> None:
        prompt_ids, results = self.run(mode, prompt, values)
        if header and not as_json:  # after the run: a bad prompt prints one error line and nothing else
            self.header()
        if as_json:
            self.print(json.dumps(self.as_json(mode, prompt, prompt_ids, results), ensure_ascii=False))
        elif mode == "generate":
            self.print_generation(prompt, prompt_ids, results[0])
        else:
            self.print_comparison(mode, prompt, results)

    # -------------------------------------------------------------- interactive

    def interactive(self, stdin=None) -> int:
        stdin = stdin or sys.stdin
        if stdin.isatty():
            import readline  # noqa: F401  (line editing and history for input())
        self.header()
        self.print("type a prompt to generate, 'chat' to chat, 'help' for commands, 'quit' to leave")
        while True:
            try:
                line = input("you> " if self.chatting else "> ").strip()
            except (EOFError, KeyboardInterrupt):
                self.print("")
                return 0
            if not line:
                continue
            command = line[1:].strip() if self.chatting and line.startswith("/") else None if self.chatting else line
            if command is not None and command.lower() in ("quit", "exit", "q"):
                return 0
            try:
                if command is None:
                    self.chat_turn(line)
                else:
                    self.command(command)
            except KeyboardInterrupt:
                self.print("interrupted")
            except (UsageError, ValueError) as e:  # SamplingError, TokenizerError, ConversationError are ValueErrors
                self.print(f"error: {e}")

    def command(self, line: str) -> None:
        from dataclasses import replace

        from nanochat.engine import SamplingError

        word, _, rest = line.partition(" ")
        word, rest = word.lower(), rest.strip()
        setters = {"temp": ("temperature", float, "a number >= 0"), "topk": ("top_k", top_k_value, "an integer or 'none'"),
                   "topp": ("top_p", float, "a number in (0, 1]"), "minp": ("min_p", float, "a number in [0, 1)"),
                   "seed": ("seed", int, "an integer >= 0")}
        if word in setters:
            field, parse, what = setters[word]
            try:
                value = parse(rest)
            except (ValueError, argparse.ArgumentTypeError):
                raise UsageError(f"{word} needs {what}, e.g. '{word} {getattr(self.settings, field) or 'none'}'") from None
            self.settings = replace(self.settings, **{field: value}).validate()
            self.print(f"settings: {self.settings.describe()}")
        elif word == "tokens":
            try:
                n = int(rest)
            except ValueError:
                raise UsageError("tokens needs an integer >= 1") from None
            if n < 1:
                raise SamplingError(f"max_tokens must be an integer >= 1, got {n}")
            self.max_tokens = n
            self.print(f"max tokens: {n}")
        elif word == "probs":
            self.show_probs = not self.show_probs
            self.print(f"probabilities: {'on' if self.show_probs else 'off'}")
        elif word == "settings":
            self.print(f"settings: {self.settings.describe()}, max {self.max_tokens} tokens, "
                       f"probabilities {'on' if self.show_probs else 'off'}, chat {'on' if self.chat else 'off'}")
        elif word == "help":
            self.print(CHAT_HELP if self.chatting else HELP)
        elif word == "chat":
            self.chatting = True
            note = "" if self.loaded.phase in ("sft", "rl") else \
                "\nnote: a base checkpoint: it never saw the chat template, so it continues the text rather than answering"
            self.print(CHAT_HELP + note)
        elif self.chatting and word in ("reset", "undo", "history", "save", "end"):
            self.chat_command(word, rest)
        elif word in ("compare-temp", "compare-topk", "compare-topp"):
            if not rest:
                raise UsageError(f"{word} needs a prompt, e.g. '{word} Once upon a time'")
            defaults = {"compare-temp": DEFAULT_TEMPS, "compare-topk": DEFAULT_TOPKS, "compare-topp": DEFAULT_TOPPS}
            self.execute(word, rest, defaults[word], as_json=False)
        elif word == "gen":
            if not rest:
                raise UsageError("gen needs a prompt")
            self.execute("generate", rest, None, as_json=False)
        else:
            self.execute("generate", line, None, as_json=False)


    # -------------------------------------------------------------- chat

    def chat_turn(self, text: str) -> None:
        """One user turn: the reply streams as it is generated (the tool loop runs), then joins the conversation."""
        from nanochat.conversation import Message
        from nanochat.engine import ResultBuilder

        messages = [*self.conversation, {"role": "user", "content": text}]
        prompt_ids = self.engine.render_chat(messages)
        options = self.trace_options() if self.show_probs else None
        events = self.engine.stream(prompt_ids, self.settings, self.max_tokens, trace=options, tools=True)
        builder = ResultBuilder(self.engine, [self.settings], options)
        self.out.write("model> ")
        for delta in builder.text_deltas(events):
            self.out.write(delta)
            self.out.flush()
        self.print("")
        row = builder.results()[0]
        content = self.engine.tokenizer.chat_template().reply_content(row.token_ids)
        self.conversation = [*messages, Message("assistant", content).to_dict()]
        calls = 0 if isinstance(content, str) else sum(p.type == "python" for p in content)
        used = len(prompt_ids) + len(row.token_ids)
        self.print(f"[{len(row.token_ids)} tokens, {'ended by the model' if row.finish_reason == 'stop' else 'max tokens'}"
                   f"{f', {calls} calculator call(s)' if calls else ''}; conversation {used} of "
                   f"{self.engine.context} context tokens]")
        if self.show_probs:
            for s in row.trace:
                self.print_step(s)

    def chat_command(self, word: str, rest: str) -> None:
        if word == "end":
            self.chatting = False
            self.print("chat mode off (the conversation is kept: 'chat' to go on)")
        elif word == "reset":
            self.conversation = []
            self.print("new conversation")
        elif word == "undo":
            if not self.conversation:
                raise UsageError("nothing to undo")
            del self.conversation[-2:]
            self.print(f"removed the last exchange ({len(self.conversation) // 2} left)")
        elif word == "history":
            if not self.conversation:
                self.print("(empty conversation)")
            for m in self.conversation:
                content = m["content"] if isinstance(m["content"], str) else "".join(
                    p["text"] if p["type"] == "text" else f"[{p['type']}: {p['text']}]" for p in m["content"])
                self.print(f"{'you' if m['role'] == 'user' else 'model'}> {content}")
        else:  # save
            from nanochat.conversation import Conversation
            from nanochat.conversation_file import append_conversation

            if not rest:
                raise UsageError("save needs a file, e.g. '/save chat.jsonl'")
            if not self.conversation:
                raise UsageError("nothing to save yet: say something first")
            path = Path(rest).expanduser()
            line = append_conversation(path, Conversation.parse(self.conversation))
            self.print(f"saved as line {line} of {path}")


# ---------------------------------------------------------------------- entry point


def settings_from_args(args):
    """The SamplingSettings the flags give: each field from the flag of the same name."""
    from nanochat.sampling import SamplingSettings

    return SamplingSettings(**{name: getattr(args, name) for name in SamplingSettings().as_dict()})


def check_numbers(args) -> None:
    """Range checks argparse cannot express, as SamplingErrors (one line, exit 1)."""
    from nanochat.sampling import SamplingError, SamplingSettings

    settings_from_args(args).validate()
    for name in ("max_tokens", "num_samples"):
        if getattr(args, name) < 1:
            raise SamplingError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.num_alternatives < 0:
        raise SamplingError(f"--num-alternatives must be >= 0, got {args.num_alternatives}")
    for flag, field in COMPARE_FLAGS.items():
        for v in getattr(args, flag) or []:
            SamplingSettings(**{**SamplingSettings().as_dict(), field: v}).validate()


def device_for(name: str):
    """The torch device --device names, if this tool can generate on it here: cpu, or an existing CUDA device.
    Anything else (meta holds no data; mps, xla, ... without their backend; cpu:3) is refused before a
    checkpoint is read, so its failure is not mistaken for a corrupt file."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    usable = "cpu" + (f" or cuda (cuda:0..cuda:{cuda - 1})" if cuda else "")
    if device.type == "cpu" and device.index not in (None, 0):
        raise UsageError(f"--device {name}: there is one CPU device; use --device cpu")
    if device.type == "cuda" and not cuda:
        raise UsageError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "cuda" and (device.index or 0) >= cuda:
        raise UsageError(f"--device {name}: this machine has {cuda} CUDA device(s) (use {usable})")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {name}: {device.type} is not available to the explorer here (use {usable})")
    return device


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    mode = next((flag.replace("_", "-") for flag in COMPARE_FLAGS if getattr(args, flag) is not None), "generate")
    if args.json and args.interactive:
        print("generation_explorer: error: --json cannot be combined with --interactive (see --help)", file=sys.stderr)
        return 2
    if not args.interactive and args.prompt is None:
        print("generation_explorer: error: give --prompt, or --interactive (see --help)", file=sys.stderr)
        return 2
    try:
        from nanochat.checkpoint_manager import CheckpointError, load_model, resolve_usable
        from nanochat.engine import Engine, SamplingError
        from nanochat.tokenizer import TokenizerError
    except ImportError as e:  # a broken install, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        check_numbers(args)
        device = device_for(args.device)
        usable = resolve_usable(args.checkpoint, step=args.step)  # a run: its newest step that passes the quick check
        for note in usable.notes():
            print(f"note: {note}", file=sys.stderr)
        loaded = load_model(usable.checkpoint, device=device)
        explorer = Explorer(loaded, Engine(loaded.model, loaded.tokenizer), args)
        if args.interactive:
            return explorer.interactive()
        defaults = {"compare-temp": DEFAULT_TEMPS, "compare-topk": DEFAULT_TOPKS, "compare-topp": DEFAULT_TOPPS}
        values = getattr(args, mode.replace("-", "_"), None) if mode != "generate" else None
        explorer.execute(mode, args.prompt, values or defaults.get(mode), args.json, header=True)
        return 0
    except (CheckpointError, TokenizerError, SamplingError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())

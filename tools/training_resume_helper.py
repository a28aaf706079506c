"""
Training Resume Helper (feature 7 of the feature guide), done properly: after a crash, which checkpoint
of a run can be trusted, and what exactly to run to continue.

    python tools/training_resume_helper.py ~/.cache/nanochat/base_checkpoints/d20
    python tools/training_resume_helper.py RUN_DIR --target-steps 5400   # train to a different length
    python tools/training_resume_helper.py RUN_DIR --verify              # deep integrity checks first
    python tools/training_resume_helper.py RUN_DIR --command             # only the command, for scripts
    python tools/training_resume_helper.py RUN_DIR --json                # the plan as JSON

It keeps the guide's interface but none of its flaws: nothing is unpickled (checks read zip directories
and JSON; `--verify` streams CRCs and hashes and loads with weights_only), a truncated or corrupt
checkpoint is skipped with the reason, and the warmdown is the training schedule's own, not a guess.
The report is `registry.resume.format_plan`, the same `python -m registry resume` prints; this tool
needs no registry database (it reads the files only), so it also works on a training node.
Exit status (as `python -m registry resume`): 0 with a command to run, 3 when nothing is resumable,
1 on bad input (one line on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere: `python tools/training_resume_helper.py`
    sys.path.insert(0, str(ROOT))

from nanochat.checkpoint_manager import CheckpointError  # noqa: E402
from registry.resume import NothingResumableError, ResumePlanError, format_plan, plan_resume  # noqa: E402

EXIT_ERROR = 1  # bad input: one line on stderr (argparse usage errors exit 2)
EXIT_NOTHING_RESUMABLE = 3  # a finding, not an error: the report says why


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="training_resume_helper.py",
        description="Find the latest checkpoint of a nanochat run that can be trusted and print how to resume from it.")
    parser.add_argument("checkpoint_dir", help="a run's checkpoint directory (e.g. <base>/base_checkpoints/d20), "
                        "a checkpoint file in it, or a base dir holding one run")
    parser.add_argument("--target-steps", type=int, default=None,
                        help="total steps to train to (default: the run's own num_iterations, resolved as training does)")
    parser.add_argument("--verify", action="store_true",
                        help="run the deep integrity checks (CRC-32, sha256, NaN/Inf, weights-only load) instead of the quick ones")
    parser.add_argument("--command", action="store_true", help="print only the resume command")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON (shape: README, integrity section)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target_steps is not None and args.target_steps <= 0:
        print("error: --target-steps must be a positive number of steps", file=sys.stderr)
        return EXIT_ERROR
    try:
        plan = plan_resume(args.checkpoint_dir, target_steps=args.target_steps, deep=args.verify)
    except NothingResumableError as e:
        if args.json:
            print(json.dumps({"resumable": False, "error": str(e), "skipped": [
                {"step": s.step, "problems": [p.__dict__ for p in s.problems]} for s in e.skipped]}, indent=2))
        else:
            print(f"error: {e}", file=sys.stderr)
            for s in e.skipped:
                print(f"  step {s.step}: {s.reason}", file=sys.stderr)
        return EXIT_NOTHING_RESUMABLE
    except (ResumePlanError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.command:
        if plan.command is None:
            print(f"error: no command can resume this run: {plan.mode_note}", file=sys.stderr)
        else:
            print(plan.command)
    else:
        print(format_plan(plan))
    return 0 if plan.resumable else EXIT_NOTHING_RESUMABLE


if __name__ == "__main__":
    sys.exit(main())

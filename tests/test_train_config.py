"""nanochat.train_config: one flag table for the trainers, the quantities derived from it, and the
resume command the trainer and the registry's planner both print."""

from __future__ import annotations

import shlex

import pytest

from nanochat.model_config import ArchitectureError, current_config, param_counts
from nanochat.train_config import (
    BASE_TRAIN,
    OPTIM_FLAGS,
    RESUME_FLAGS,
    RUN_FLAGS,
    Flag,
    Trainer,
    flag_values,
    resume_command,
    run_shape,
)


def test_a_new_trainer_adds_its_own_flags_to_the_shared_groups():
    sft = Trainer("scripts.chat_sft", "Fine-tune.", RUN_FLAGS + OPTIM_FLAGS + RESUME_FLAGS
                  + (Flag("mmlu_epochs", int, 3, "epochs over MMLU"),))
    args, explicit = sft.parse_args(["--", "--mmlu-epochs", "5", "--device", "cpu", "--resume"])
    assert (args.mmlu_epochs, args.device_type, args.matrix_lr, explicit) == (5, "cpu", 0.02,
                                                                              {"mmlu_epochs", "device_type", "resume"})
    # a resume inherits the run's own flags but never its device or which step it resumed
    saved = {"mmlu_epochs": 7, "matrix_lr": 0.05, "device_type": "cuda", "resume_from_step": 3}
    assert sft.inherited(saved, explicit) == {"matrix_lr": 0.05}
    cmd = resume_command(sft, vars(args), world_size=1, resume_step=9)
    assert cmd.line.startswith("python -m scripts.chat_sft --run=dummy --device-type=cpu ")
    assert "--mmlu-epochs=5" in cmd.argv and cmd.argv[-1] == "--resume-from-step=9" and "--resume" not in cmd.argv
    reparsed, _ = sft.parse_args(list(cmd.argv[3:]))
    assert {**vars(args), "resume": False, "resume_from_step": 9} == vars(reparsed)


def test_run_shape_derives_what_base_train_derives():
    shape = run_shape({"depth": 4, "aspect_ratio": 32, "head_dim": 32, "max_seq_len": 256, "device_batch_size": 8,
                       "total_batch_size": 4096, "target_param_data_ratio": 20}, vocab_size=2048, world_size=1)
    cfg = current_config(4, 32, 32, 256, 2048, "SSSL")
    assert shape.config == cfg and shape.grad_accum == 2 and shape.problems == ()
    assert shape.num_iterations == int(20 * param_counts(cfg)["scaling"]) // 4096
    assert shape.tokens == shape.num_iterations * 4096
    defaults = run_shape({}, vocab_size=32768)  # base_train's defaults: d20, the batch from upstream's rule
    assert defaults.config.n_layer == 20 and defaults.total_batch_size == 2 ** 20 and defaults.num_iterations > 0
    bad = run_shape({"depth": 4, "max_seq_len": 256, "device_batch_size": 3, "total_batch_size": 4096, "aspect_ratio": 32,
                     "head_dim": 32, "num_iterations": 5}, vocab_size=2048, world_size=2)
    assert bad.grad_accum is None and bad.problems == (
        "--total-batch-size 4,096 is not a multiple of device batch × sequence × processes (3 × 256 × 2 = 1,536)",)
    with pytest.raises(ArchitectureError):
        run_shape({"depth": 9, "warmup_ratio": 0.0}, vocab_size=65536)  # classic: 576 wide, 5 heads


def test_classic_flags_keep_classic_defaults():
    values = flag_values({"warmup_ratio": 0.0, "depth": 12})
    assert "warmup_steps" not in values and values["total_batch_size"] == 524288
    shape = run_shape({"warmup_ratio": 0.0, "depth": 12, "total_batch_size": -1}, vocab_size=65536)
    assert shape.classic and shape.total_batch_size is None
    assert shape.problems[0] == "classic nanochat needs an explicit --total-batch-size"


def test_every_base_train_flag_has_help_and_a_default_of_its_type():
    for f in BASE_TRAIN.flags:
        assert f.help and (f.default is None or isinstance(f.default, f.type) or (f.type is float and
                                                                                  isinstance(f.default, int))), f.dest
    assert shlex.split(resume_command(BASE_TRAIN, BASE_TRAIN.defaults(), world_size=1, resume_step=1).line)[:3] == \
        ["python", "-m", "scripts.base_train"]

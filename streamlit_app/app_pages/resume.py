"""Resume: the resume planner's report for a run, its LR schedule, and the command to run."""

from __future__ import annotations

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from registry.errors import NothingResumableError, RegistryError
from streamlit_app import charts, data, frames, ui

MODE_LABELS = {"exact": "✓ exact", "approximate": "≈ approximate", "restart": "↻ restart", "unsupported": "✗ unsupported"}
# The planner's warnings are sentences; each is shown next to what it concerns, found by how it starts.
TOPICS = (("skipped newer step", "skipped"), ("loss spike", "val"), ("training had reached step", "remaining"),
          ("target ", "target"), ("the run is complete", "remaining"))


def topic(warning: str) -> str:
    return next((t for prefix, t in TOPICS if warning.startswith(prefix)), "general")


ui.header("Resume", "After a crash: which checkpoint can I trust, and exactly what do I run to continue?")
url = ui.registry_url()
runs = ui.load_runs(url)
c_run, c_target, c_deep = st.columns([3, 2, 2], vertical_alignment="bottom")
# the newest run that has something left to do (a crashed or stopped run), else the newest
unfinished = next((i for i, r in enumerate(runs) if r.status in ("stopped", "incomplete", "training")), 0)
run_id = ui.run_picker(runs, container=c_run, index=unfinished)
target = c_target.number_input("Target steps (0 = the run's own)", min_value=0, value=0, step=100, key="target",
                               bind="query-params", help="Train to a different number of steps: the command then passes "
                               "--num-iterations, which moves the LR schedule.")
deep_key = ("deep_plan", run_id, int(target))
if c_deep.button("Deep-check and plan", icon=":material/policy:", width="stretch",
                 help="Read every byte of the candidate checkpoints (CRCs, NaNs, safe pickle, sha256) and record the "
                      "results; the quick plan reuses them while the files stay unchanged."):
    with st.spinner("Deep-checking checkpoints, newest first…"):
        try:
            st.session_state[deep_key] = data.deep_resume_plan(url, run_id, int(target) or None)
        except (RegistryError, CheckpointError) as e:
            st.session_state.pop(deep_key, None)
            ui.show_error(e)

try:
    plan = st.session_state.get(deep_key) or data.resume_plan(url, run_id, int(target) or None)
except NothingResumableError as e:
    ui.show_error(e, "Every checkpoint of this run failed its check. Restart the run, or repair the files (the list "
                     "below says what is wrong with each).")
    for s in e.skipped:
        st.warning(f"step {s.step}: {s.reason}")
    st.stop()
except (RegistryError, CheckpointError) as e:
    ui.show_error(e)
    st.stop()

if st.session_state.get(deep_key) is plan:  # say that the button did what it says, and what it found
    skipped = f"; {len(plan.skipped)} newer checkpoint(s) failed and are listed below" if plan.skipped else ""
    st.success(f"Deep check done: step {plan.step:,} passed with every byte read (CRCs, NaN/Inf, pickle safety, "
               f"sha256), recorded in the registry{skipped}. The plan below uses it.", icon=":material/verified:")

warnings: dict[str, list[str]] = {}
for w in plan.warnings:
    if plan.mode == "unsupported" and w == plan.mode_note:
        continue  # shown with the mode tile
    warnings.setdefault(topic(w), []).append(w)

# ---------------------------------------------------------------------- the answer first
t1, t2, t3, t4 = st.columns([1, 1, 1.1, 1.25])  # the last holds "≈ approximate"
with t1:
    st.metric("Resume from step", f"{plan.step:,}",
              f"val bpb {plan.val_bpb:.4f}" if plan.val_bpb is not None else "no val bpb recorded", delta_color="off",
              delta_arrow="off", border=True, help=f"Cleared by a {plan.integrity_level} check; segment {plan.segment} wrote it, "
              f"the command starts segment {plan.segment + 1}.")
with t2:
    remaining = f"{plan.remaining_steps:,}" if plan.remaining_steps is not None else "?"
    st.metric("Remaining steps", remaining,
              (f"of {plan.target_steps:,} · ETA {frames.duration(plan.eta_s)}" if plan.eta_s is not None
               else f"of {plan.target_steps:,} ({plan.progress:.0%} done)") if plan.target_steps else "target unknown",
              delta_color="off", delta_arrow="off", border=True,
              help=f"Target from {plan.target_source}; ETA {frames.duration(plan.eta_s)} at "
                   f"{plan.step_time_s or 0:.2f} s/step ({plan.step_time_source or 'no step times'}).")
with t3:
    st.metric("LR multiplier at resume", f"×{plan.lr_multiplier:.4f}" if plan.lr_multiplier is not None else "—",
              plan.schedule_phase or "schedule unknown", delta_color="off", delta_arrow="off", border=True,
              help="From the training script's own schedule function (nanochat.schedule).")
with t4:
    st.metric("Resume", MODE_LABELS.get(plan.mode, plan.mode), f"{plan.world_size} process(es)", delta_color="off",
              delta_arrow="off", border=True, help=plan.mode_note)
if plan.eta_s is not None and plan.remaining_steps:
    st.caption(f"ETA {frames.duration(plan.eta_s)}: {plan.remaining_steps:,} steps at {plan.step_time_s:.2f} s/step "
               f"({plan.step_time_source or 'measured'}), {plan.progress:.0%} of {plan.target_steps:,} done.")
# each warning under the tiles, in the tiles' order: val bpb, remaining steps, the target, the resume mode
for w in warnings.pop("val", []):
    st.warning(w, icon=":material/trending_up:")
for w in warnings.pop("remaining", []):
    st.warning(w, icon=":material/schedule:")
for w in warnings.pop("target", []):
    st.warning(w, icon=":material/flag:")
if plan.mode != "exact":
    st.warning(f"**{plan.mode.capitalize()} resume**: {plan.mode_note}", icon=":material/warning:")
# why not a newer step: the checkpoints that failed their check, newest first
for s in plan.skipped:
    st.warning(f"**Skipped step {s.step}**: {s.reason}", icon=":material/skip_next:")

# ---------------------------------------------------------------------- the command
st.subheader("Command")
if plan.command:
    if plan.workbench_command:  # two ways on: say which is which
        st.markdown("**Upstream's own resume** (in the upstream nanochat checkout that wrote the run):")
    st.code(plan.command, language="bash", wrap_lines=True)
    st.caption((plan.script_note + " · " if plan.script_note else "") + "Copy it with the button in the corner; run it from "
               "the folder that holds scripts/ (your nanochat checkout).")
else:
    st.error(f"No command: {plan.mode_note}", icon=":material/error:")
if plan.workbench_command:  # an upstream-written base run: our trainer can take it on
    st.markdown("**Or continue it with the workbench's trainer** (approximate once, exact from its first checkpoint on):")
    st.code(plan.workbench_command, language="bash", wrap_lines=True)
    st.caption(plan.workbench_note[0].upper() + plan.workbench_note[1:] + ". Run it from this project's folder.")
if plan.approximate_resume:
    a = plan.approximate_resume
    st.info(f"Segment {a.get('segment')} continued upstream's step {a.get('from_step')} approximately "
            f"(--allow-approximate): {a.get('reason')}. Every checkpoint since resumes exactly.", icon=":material/history:")
if plan.better_command:
    st.warning(f"Step {plan.better_step:,} has a clearly better val bpb and is resumable. To continue from before the "
               "loss spike instead:", icon=":material/undo:")
    st.code(plan.better_command, language="bash", wrap_lines=True)

# ---------------------------------------------------------------------- the schedule
st.subheader("Learning-rate schedule")
lr = frames.lr_frame(plan)
if lr.empty:
    st.info("The run's target steps are unknown, so its schedule cannot be drawn: pass a target above.", icon=":material/straighten:")
else:
    own = frames.own_lr_frame(plan)
    st.altair_chart(charts.lr_chart(lr, frames.schedule_phases(plan), plan.step, plan.lr_multiplier, plan.reached_step,
                                    own=own), width="stretch")
    s = plan.schedule
    st.caption(f"{s.num_iterations:,} steps: warmup {s.warmup_steps:,}, warmdown from step {s.warmdown_start:,} "
               f"({s.warmdown_ratio:.0%} of the run) to ×{s.final_lr_frac:g}. The red band, if any, is work after the "
               "checkpoint that will be trained again"
               + (f"; dashed grey: the run's own {plan.run_num_iterations:,}-step schedule, which the new target replaces "
                  "(the red bar is the jump at the resume step)." if not own.empty else "."))

# ---------------------------------------------------------------------- what else the planner saw
warnings.pop("skipped", None)  # the same facts as plan.skipped, listed under the tiles
for w in warnings.pop("general", []):
    st.warning(w)
with st.expander("Model and training config", icon=":material/tune:"):
    left, right = st.columns(2)
    left.dataframe(frames.config_frame(plan.model_config), hide_index=True, width="stretch")
    right.dataframe(frames.config_frame(plan.training_config), hide_index=True, width="stretch")
with st.expander("Checkpoint files", icon=":material/description:"):
    st.markdown("\n".join(f"- `{f}`" for f in plan.files) + f"\n\nin `{plan.run_dir}` (checked: {plan.integrity_level})")

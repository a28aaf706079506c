"""
Rendering pieces every page shares: the page header, opening the registry (or explaining why it cannot
be opened), the empty-registry state with its scan control, the scan control itself, the run picker,
named errors turned into `st.error` with what to do next, the sampling and token display controls, and
the per-token view of one generation with its branch control (Generate and Chat; drawn with traces.py
and charts.py).

It calls `data.py` and Streamlit only; no SQL, no torch, no caching of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from nanochat.checkpoint_manager import CheckpointError
from nanochat.sampling import SamplingSettings, StepTrace
from registry.errors import RegistryError
from streamlit_app import charts, data, frames, traces

# Generated text whose tokens can be clicked: the span's data-step comes back as the trigger value
# "step" (inline JS, no build step; components.v2). The HTML is ours and escaped (traces.shaded_html).
_CLICKABLE_TEXT = st.components.v2.component("nanochat_clickable_text", js="""
export default function(component) {
    const { data, setTriggerValue, parentElement } = component;
    let box = parentElement.querySelector('div.clickable');
    if (!box) { box = document.createElement('div'); box.className = 'clickable'; parentElement.appendChild(box); }
    box.innerHTML = data;
    box.querySelectorAll('[data-step]').forEach((el) => {
        el.onclick = () => setTriggerValue('step', Number(el.dataset.step));
    });
}
""")
# Scrolls the page to where it is mounted, once (after a branch is made, to show it).
_SCROLL_HERE = st.components.v2.component("nanochat_scroll_here", isolate_styles=False, js="""
export default function(component) {
    const el = component.parentElement;
    setTimeout(() => el.scrollIntoView({behavior: 'smooth', block: 'center'}), 300);
}
""")
SCAN_REPORT = "scan_report"  # session key: the last scan's report, shown once after the rerun it causes
# What to do next, by the `code` of a nanochat.checkpoint_manager.CheckpointError.
CHECKPOINT_HINTS = {
    "missing_file": "It was deleted or moved after the last scan: rescan its folder on the Runs page, or pick another checkpoint.",
    "missing_model": "Its model file is gone (deleted after the last scan, or a save that never finished): rescan its folder on "
                     "the Runs page, or pick another step.",
    "missing_meta": "Its meta file is missing (a save that never finished, or files deleted after the last scan): rescan its "
                    "folder on the Runs page, or pick another step.",
    "missing_tokenizer": "Put the run's tokenizer in <base dir>/tokenizer/ (tokenizer.json, or upstream's tokenizer.pkl), "
                         "or set NANOCHAT_BASE_DIR to the base dir that holds it, then reload.",
    "bad_tokenizer": "The tokenizer files are damaged: copy the run's tokenizer/ folder again.",
    "vocab_mismatch": "This tokenizer belongs to another model: use the tokenizer the run was trained with.",
    "truncated": "The file is damaged or still being written: run a deep check on the Integrity page, or pick an earlier step.",
    "unsafe_pickle": "The file references code, so it is never loaded: run a deep check on the Integrity page for details.",
}


def scan_pending() -> bool:
    """A scan just finished and its report is waiting to be shown (keep its control open)."""
    return SCAN_REPORT in st.session_state


def header(title: str, question: str) -> None:
    st.title(title)
    st.caption(question)


def show_error(e: BaseException, what_next: str | None = None) -> None:
    """One named error as st.error: its one-line message, then what to do next."""
    message = (str(e).strip() or type(e).__name__).splitlines()[0]  # one line, whatever a layer below wrote
    hint = what_next or CHECKPOINT_HINTS.get(getattr(e, "code", None) or "", "")
    if not hint and isinstance(e, CheckpointError):
        hint = "Pick another checkpoint, or rescan its folder on the Runs page if its files changed after the last scan."
    st.error(f"{message}" + (f"\n\n{hint}" if hint else ""), icon=":material/error:")


def registry_url() -> str:
    """The URL of the open registry; renders the problem and stops the page when there is none."""
    target = data.registry_target()
    if target.problem:
        st.error(target.problem, icon=":material/folder_off:")
        st.stop()
    try:
        data.store(target.url)
    except RegistryError as e:
        show_error(e, f"Registry: {target.url} (from {target.source}). Point the app at another one with "
                      "`-- --base-dir DIR` or `-- --db URL`.")
        st.stop()
    return target.url


def scan_control(url: str, key: str = "scan", label: str = "Folder to scan") -> None:
    """A folder box (default: the base dir) and a Scan button with a progress bar; reruns the page after
    a scan so everything shows the new index, and reports what the scan found."""
    target = data.registry_target()
    left, right = st.columns([6, 1], vertical_alignment="bottom")
    path = left.text_input(label, value=target.scan_default, key=f"{key}_path",
                           help="A nanochat base dir (with base_checkpoints/, chatsft_checkpoints/...), one run's "
                                "checkpoint folder, or any folder above them. Only metadata is read. Upstream console "
                                "logs (*.log) and base_eval CSVs found there are imported too; a log file alone works.")
    if right.button("Scan", key=f"{key}_go", type="primary", width="stretch"):
        bar = st.progress(0.0, text="Looking for checkpoints…")

        def progress(done: int, total: int, message: str) -> None:
            bar.progress(min(1.0, done / max(total, 1)), text=f"scanned {done}/{total} · {message}")

        try:
            report = data.scan_or_import(url, path, progress)
        except (RegistryError, CheckpointError) as e:  # the named errors of a scan: one line each (a bad file
            # inside the tree is not one of them: the report lists it as a problem of its checkpoint)
            bar.empty()
            show_error(e, "Give a folder that holds nanochat checkpoints (model_NNNNNN.pt + meta_NNNNNN.json) "
                          "or a base dir above them.")
            return
        bar.empty()
        st.session_state[SCAN_REPORT] = report
        st.rerun()
    report, logs = st.session_state.pop(SCAN_REPORT, (None, None))
    if logs is not None:
        for r in logs.reports:
            st.success(f"Imported {Path(r.path).name} into {', '.join(r.runs)}: {r.points_new:,} new metric points, "
                       f"{r.evals_new} new evaluations.", icon=":material/article:")
            for u in r.unmatched:
                st.warning(f"{Path(r.path).name}: not imported: {u}")
        for f, why in logs.failures:
            st.warning(f"{Path(f).name}: not imported: {why}")
    if report is not None:
        st.success(f"Scanned {report.root} in {report.duration_s or 0:.1f} s: {report.runs_found} runs ({report.runs_new} new), "
                   f"{report.checkpoints_seen} checkpoints ({report.checkpoints_new} new, {report.checkpoints_changed} changed, "
                   f"{report.checkpoints_missing} gone), {report.metric_lines:,} metric lines.", icon=":material/check_circle:")
        for p in report.problems[:5]:
            st.warning(f"{p.path}: {p.code}: {p.message}")
        if len(report.problems) > 5:
            st.caption(f"… and {len(report.problems) - 5} more problems (see `python -m registry checkpoints RUN`).")


def empty_state(url: str, message: str, key: str, caption: str | None = None) -> None:
    """What a page shows when the registry holds nothing for it: `message` (how to get some), the scan
    control (widget keys from `key`) and an optional caption; stops the page."""
    st.info(message, icon=":material/inbox:")
    scan_control(url, key=key)
    if caption:
        st.caption(caption)
    st.stop()


def empty_registry(url: str) -> None:
    """What a page shows when the registry has no run: how to fill it, with the scan control."""
    empty_state(url, "**No runs in this registry yet.** Scan a folder that holds nanochat checkpoints: a base dir "
                     "(`~/.cache/nanochat` or `$NANOCHAT_BASE_DIR`) or any run folder.", "empty_scan",
                f"Registry: `{url}`. From a shell: `python -m registry scan DIR --db {url}`.")


def load_runs(url: str) -> list:
    """The registry's runs, or the empty state (which stops the page)."""
    try:
        found = data.runs(url)
    except RegistryError as e:
        show_error(e)
        st.stop()
    if not found:
        empty_registry(url)
    return found


def load_model_choices(url: str):
    """The loadable checkpoints (a DataFrame), or stop the page with a message saying how to get one."""
    try:
        choices = data.model_choices(url)
    except RegistryError as e:
        show_error(e)
        st.stop()
    if choices.empty:
        st.info("No loadable checkpoint in the registry (every one is incomplete or deleted). Scan a folder with complete "
                "checkpoints on the Runs page.", icon=":material/inbox:")
        st.stop()
    return choices


def run_picker(runs: list, key: str = "run", label: str = "Run", container=None, index: int = 0) -> int:
    """A selectbox of runs (newest activity first; `index` preselected), kept in the URL as ?run=NAME."""
    names = frames.run_names(runs)
    where = container or st
    return where.selectbox(label, [r.id for r in runs], index=index, format_func=lambda i: names[i], key=key,
                           bind="query-params",
                           help="Runs are listed by last activity, newest first.")


@dataclass(frozen=True)
class PickedCheckpoint:
    """The checkpoint a model page loads: its run, step, folder and file stamp (the model cache key)."""

    run_id: int
    step: int
    directory: str
    stamp: tuple
    phase: str
    label: str  # "run @ step N", for spinners and captions


def checkpoint_picker(runs: list, choices, run_box, step_box, first=None) -> PickedCheckpoint:
    """The run and step pickers of the pages that load one model (Generate, Chat, Attention), kept in the
    URL as ?run=&step=: runs with a loadable checkpoint (`choices`, from `load_model_choices`), in activity
    order or sorted stably by `first(run)`, and that run's complete checkpoints, newest first."""
    loadable = [r for r in runs if r.id in set(choices["run_id"])]
    if first is not None:
        loadable = sorted(loadable, key=first)
    run_id = run_picker(loadable, container=run_box)
    steps = [int(s) for s in choices[choices["run_id"] == run_id].sort_values("step", ascending=False)["step"]]
    step = step_box.selectbox("Step", steps, format_func=lambda s: f"step {s:,}", key="step", bind="query-params",
                              help="Complete checkpoints of this run, newest first")
    row = choices[(choices["run_id"] == run_id) & (choices["step"] == step)].iloc[0]
    directory = str(row["directory"])
    return PickedCheckpoint(run_id, step, directory, data.model_stamp(directory, step),
                            next(r.phase for r in runs if r.id == run_id),
                            f"{frames.run_names(runs)[run_id]} @ step {step:,}")


def typed_folder(label: str, key: str, placeholder: str, when_empty: str) -> str:
    """A text box for a folder the registry does not know (the pickers' "other" choice); until one is typed
    the page stops with `when_empty`. The folder with ~ expanded."""
    typed = st.text_input(label, key=key, placeholder=placeholder).strip()
    if not typed:
        st.info(when_empty, icon=":material/info:")
        st.stop()
    return str(Path(typed).expanduser())


def clickable_text(html_text: str, key: str) -> int | None:
    """Render escaped HTML whose [data-step] spans are clickable; the step clicked on this rerun, else None."""
    result = _CLICKABLE_TEXT(data=html_text, key=key, on_step_change=lambda: None)
    step = getattr(result, "step", None)
    return int(step) if step else None


def scroll_here(key: str) -> None:
    """Scroll the browser to this point of the page (mount it on one rerun only)."""
    _SCROLL_HERE(key=key, height=0)


def status_label(status: str) -> str:
    return frames.STATUS_LABELS.get(status, status)


# ---------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class SamplingChoice:
    """What the sampling controls ask for: the engine's settings, the token budget and how many
    alternatives per step the grid shows."""

    settings: SamplingSettings
    max_tokens: int
    alternatives: int


def sampling_controls(max_tokens: int = 48, seed_help: str = "Same seed, same settings: same text.") -> SamplingChoice:
    """The sampling widgets of the Generate and Chat pages, in the sidebar and kept in the URL (same
    keys on both pages, so a link carries them across)."""
    with st.sidebar:
        st.markdown("**Sampling**")
        temperature = st.slider("Temperature", 0.0, 2.0, 0.8, 0.05, key="t", bind="query-params", help="0 = greedy (argmax)")
        top_k = st.number_input("Top-k (0 = off)", 0, 100_000, 50, key="k", bind="query-params")
        top_p = st.slider("Top-p (1 = off)", 0.05, 1.0, 1.0, 0.05, key="p", bind="query-params")
        seed = st.number_input("Seed", 0, 2**31 - 1, 42, key="seed", bind="query-params")
        n = st.number_input("Max new tokens", 1, 512, max_tokens, key="n", bind="query-params")
        alternatives = st.slider("Alternatives per step", 1, 10, 5, key="alts", bind="query-params")
        st.caption(f"Filters apply in this order: temperature, top-k, top-p. {seed_help}")
    settings = SamplingSettings(temperature=float(temperature), top_k=int(top_k) or None, top_p=float(top_p), seed=int(seed))
    return SamplingChoice(settings, int(n), int(alternatives))


@dataclass(frozen=True)
class TokenDisplay:
    """How generated tokens are drawn: shaded by likelihood or surprise, probabilities printed in the grid or not."""

    shading: str = "likely"  # a key of traces.SHADINGS
    probabilities: bool = False


def display_controls() -> TokenDisplay:
    """The token display widgets of the Generate and Chat pages, in the sidebar and kept in the URL."""
    with st.sidebar:
        st.markdown("**Display**")
        shading = st.segmented_control("Shade tokens by", list(traces.SHADINGS), default="likely", key="shade",
                                       bind="query-params", format_func={"likely": "likelihood", "surprise": "surprise"}.get,
                                       help="likelihood: darker = more probable under the model; surprise: darker = less "
                                            "probable (−log₂ p), so the unexpected tokens stand out") or "likely"
        probabilities = st.toggle("Probabilities in the grid", key="show_p", bind="query-params",
                                  help="Print each cell's model probability under its token")
    return TokenDisplay(shading, bool(probabilities))


# ---------------------------------------------------------------------- one generation, token by token


@dataclass(frozen=True)
class BranchRequest:
    """Continue a generation from `step` (0-based) with `token_id` instead of what it sampled there."""

    step: int
    token_id: int
    token: str


def step_key(key: str) -> str:
    """The session key of the step a token view inspects (a page sets it to select a step, e.g. on a text click)."""
    return f"{key}_step"


def token_details(gen: traces.Generation, key: str, alternatives: int, display: TokenDisplay = TokenDisplay(),
                  window: int = 20, titled: bool = False) -> BranchRequest | None:
    """One generation token by token (the Generate and Chat pages): the alternatives grid (a click picks a
    step, and an alternative's cell preselects it; a fragment, so moving its window redraws it alone), entropy
    per step, the picked step's distribution and the control to branch from one of its alternatives.
    Widget keys start with `key`; the inspected step is `step_key(key)`. `titled` adds section headings.
    Returns the branch asked for on this run, else None. Steps the tool loop forced cannot be branched from."""
    n = len(gen.steps)
    if not n:
        st.caption("No token was generated.")
        return None
    inspected = step_key(key)
    if titled:
        st.subheader("Per-step alternatives")
    _alternatives_grid(gen, key, alternatives, display, window)
    if titled:
        st.subheader("Inspect a step and branch")
    inspect = st.columns([1, 4])[0].number_input("Step", 1, n, key=inspected)
    s = gen.steps[inspect - 1]
    how = ", the tool's output" if s.tool_output else (", forced by a branch" if s.forced else "")
    left, right = st.columns([3, 2])
    with left:
        st.markdown(f"Step {inspect}: sampled **`{traces.visible(gen.token_text(s.token_id))}`** with model p = "
                    f"{s.model_prob:.3f} (sampling p = {s.sampled_prob:.3f}, rank {s.rank}{how}); entropy {s.entropy:.3f} nats.")
        st.altair_chart(charts.distribution_chart(traces.distribution_frame(gen, inspect - 1)), width="stretch")
        st.caption(f"The top {len(s.alternatives)} tokens by model probability: blue as the model sees them, orange as "
                   "sampling saw them after temperature and filters; faded bars were filtered out.")
    with right:
        others = _branch_options(s)
        if s.tool_output:
            st.caption("The calculator wrote this token (the tool's output is forced, never sampled): branch from a "
                       "step the model chose.")
            return None
        if not others:
            st.caption("No alternative was traced at this step.")
            return None
        pick = st.radio("Continue instead with", list(range(len(others))), key=f"{key}_alt_{inspect}",
                        format_func=lambda i: f"`{traces.visible(gen.token_text(others[i].token_id))}`  "
                                              f"p={others[i].model_prob:.3f}" + ("" if others[i].kept else " (filtered out)"))
        branch = st.button("Branch from here", key=f"{key}_branch", type="primary", icon=":material/call_split:")
        st.caption("The branch keeps this generation's tokens up to the step, emits the chosen token there, and "
                   "continues with the same settings and seed.")
        if branch:
            alt = others[pick]
            return BranchRequest(inspect - 1, alt.token_id, gen.token_text(alt.token_id))
    return None


def _branch_options(s: StepTrace) -> list:
    """The alternatives a step can branch to (the radio's options, in order): the traced ones but the sampled token."""
    return [a for a in s.alternatives if a.token_id != s.token_id][:10]


@st.fragment
def _alternatives_grid(gen: traces.Generation, key: str, alternatives: int, display: TokenDisplay, window: int) -> None:
    """The grid and the entropy chart over a window of steps. Moving the window redraws this fragment alone;
    a clicked cell reruns the page (the inspected step is drawn outside it)."""
    n, inspected = len(gen.steps), step_key(key)
    first = 0
    if n > window:
        wanted, shown_from = int(st.session_state.get(inspected, 1)), int(st.session_state.get(f"{key}_from", 1))
        if not shown_from <= wanted < shown_from + window:  # a step selected outside the window (a text click): move it
            st.session_state[f"{key}_from"] = min(max(1, wanted - window // 2), n - window + 1)
        first = st.slider("First step shown", 1, n - window + 1, 1, key=f"{key}_from") - 1
    picked = (st.session_state.get(f"{key}_grid") or {}).get("selection", {}).get("cell") or []
    if picked and picked != st.session_state.get(f"{key}_last_pick"):
        # a clicked cell selects its step below, and an alternative's cell preselects it for branching
        st.session_state[f"{key}_last_pick"] = picked
        clicked, row = int(picked[0]["step"]), str(picked[0].get("row", "sampled"))
        st.session_state[inspected] = clicked
        if row.startswith("#") and 1 <= clicked <= n:
            s = gen.steps[clicked - 1]
            ids, rank = [a.token_id for a in _branch_options(s)], int(row[1:])
            if rank <= len(s.alternatives) and s.alternatives[rank - 1].token_id in ids:
                st.session_state[f"{key}_alt_{clicked}"] = ids.index(s.alternatives[rank - 1].token_id)
        st.rerun(scope="app")  # once per click: the pick is remembered
    st.session_state[inspected] = min(max(1, int(st.session_state.get(inspected, 1))), n)
    st.altair_chart(charts.generation_chart(traces.alternatives_frame(gen, alternatives, first, first + window),
                                            selected_step=st.session_state[inspected], shading=display.shading,
                                            probabilities=display.probabilities),
                    on_select="rerun", key=f"{key}_grid", selection_mode="cell", width="stretch")
    shade_note = "darker blue = more probable under the model" if display.shading == "likely" else "darker red = more surprising"
    st.caption("Columns are generated steps; the top row is the token sampled, the rows below the most likely tokens "
               f"({shade_note}, grey = removed by top-k/top-p, red outline = the one sampled). Click a cell to inspect "
               "that step below" + ("" if display.probabilities else "; turn on “Probabilities in the grid” in the "
                                                                   "sidebar to print them") + ".")
    st.markdown("**Entropy per step** (how spread the model's distribution is, in nats)")
    st.altair_chart(charts.entropy_chart(traces.steps_frame(gen).iloc[first:first + window]), width="stretch")

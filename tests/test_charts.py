"""The app's pure layers without a Streamlit runtime: chart functions (DataFrame -> Altair spec), the
registry-to-table transforms (frames), generation traces and text statistics (traces), and which
registry the app opens (data.registry_target)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from nanochat.sampling import Alternative, RowResult, SamplingSettings, StepTrace
from registry.entities import (
    CHECKPOINT_STATES,
    CheckpointRecord,
    ConfigDiff,
    DiffRow,
    IntegrityRecord,
    MetricPoint,
    MetricSeries,
    RunSummary,
    checkpoint_state,
)
from streamlit_app import charts, frames, traces
from streamlit_app.data import DEMO_DIR, registry_target

# ---------------------------------------------------------------------- small stand-ins for registry entities


@dataclass(frozen=True)
class Run:
    id: int
    label: str
    total_batch_size: int | None = 1000
    flops_per_token: int | None = 6
    origin: str | None = None


@dataclass(frozen=True)
class Point:
    step: int
    value: float | None
    segment: int
    wall_time: float | None


@dataclass(frozen=True)
class Series:
    run_id: int
    key: str
    points: tuple


@dataclass(frozen=True)
class Integrity:
    mode: str
    ok: bool
    problems: tuple = ()
    checked_at: datetime = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Ckpt:
    id: int
    step: int
    missing: bool = False
    complete: bool = True
    problems: tuple = ()
    latest_integrity: Integrity | None = None
    run_id: int = 1
    run_label: str = "base/d1"
    segment: int = 1
    val_bpb: float | None = 3.0
    resumable: bool = True
    has_train_state: bool = True
    size_bytes: int = 10**6
    mtime: datetime | None = None
    directory: str = "/runs/d1"
    layout: str = "upstream"
    label: str = field(default="base/d1@1")


def spec(chart) -> dict:
    return json.loads(chart.to_json())


def layers(s: dict) -> list[dict]:
    return s.get("layer", [s])


def metrics_df() -> pd.DataFrame:
    """Run 1: one segment; run 2: resumed at step 3 (segment 2 redoes steps 3..4)."""
    series = [
        Series(1, "train_loss", tuple(Point(s, 5.0 - s / 10, 1, 100.0 + s) for s in range(6))),
        Series(2, "train_loss", tuple(Point(s, 6.0 - s / 10, 1, 200.0 + s) for s in range(5))
               + tuple(Point(s, 6.0 - s / 10, 2, 300.0 + s) for s in range(3, 8))),
        Series(2, "val_bpb", (Point(0, 4.0, 1, 200.0), Point(4, 3.5, 1, 204.0), Point(6, 3.2, 2, 303.0), Point(7, float("nan"), 2, 304.0))),
    ]
    runs = {1: Run(1, "base/a"), 2: Run(2, "base/b", total_batch_size=None)}
    return frames.metric_frame(series, runs, {1: "base/a", 2: "base/b"})


# ---------------------------------------------------------------------- curves


def test_metric_frame_has_every_x_axis_and_drops_nan():
    df = metrics_df()
    a = df[df["run"] == "base/a"]
    assert list(a["tokens"]) == [s * 1000 for s in a["step"]] and list(a["flops"]) == [s * 6000 for s in a["step"]]
    assert a["elapsed_s"].min() == 0 and a["elapsed_s"].max() == 5
    assert df[df["run"] == "base/b"]["tokens"].isna().all()  # no batch size recorded: no token axis
    assert len(df[df["key"] == "val_bpb"]) == 3  # the NaN point is not plotted


def test_resume_points_mark_where_each_resumed_segment_starts():
    r = frames.resume_points(metrics_df())
    assert r[["run", "segment", "step"]].values.tolist() == [["base/b", 2, 3]]


def test_metric_chart_lines_per_segment_resume_rule_zoom_and_tooltips():
    df = metrics_df()
    s = spec(charts.metric_chart(df, "train_loss", "step", smoothing=0.6, log=True, resumes=frames.resume_points(df)))
    assert all(layer["encoding"]["detail"]["field"] == "segment" for layer in layers(s)[:3])  # segments never join
    params = s.get("params", []) + [p for layer in layers(s) for p in layer.get("params", [])]
    assert any(p.get("select", {}).get("type") == "interval" and p.get("bind") == "scales" for p in params)
    marks = [layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"] for layer in layers(s)]
    assert marks.count("rule") == 1
    for layer in layers(s):
        if (layer["mark"]["type"] if isinstance(layer["mark"], dict) else layer["mark"]) != "text":
            assert layer["encoding"].get("tooltip"), layer["mark"]
    y = layers(s)[0]["encoding"]["y"]
    assert y["scale"]["type"] == "log" and "train loss" in y["title"]
    datasets = list(s["datasets"].values())
    rule = next(d for d in datasets if d and "segment" in d[0] and len(d) == 1)
    assert rule[0]["step"] == 3 and rule[0]["x"] == 3


def test_metric_chart_x_axes_and_units():
    df = metrics_df()
    axes = (("tokens", "tokens", "tokens"), ("flops", "flops", "FLOPs"), ("time", "elapsed_s", "since the run started (s)"))
    for x, field_, title in axes:
        s = spec(charts.metric_chart(df, "train_loss", x))
        enc = s["layer"][0]["encoding"]["x"]
        assert title in enc["title"]
        data = next(d for d in s["datasets"].values() if d and "smoothed" in d[0])
        assert all(row["x"] == row[field_] for row in data if row[field_] is not None)


def test_runs_keep_their_colour_whatever_else_is_selected():
    df = metrics_df()
    both = charts.run_scale(df).to_dict()
    only_b = charts.run_scale(df[df["run_id"] == 2]).to_dict()
    assert dict(zip(both["domain"], both["range"]))["base/b"] == only_b["range"][0] == charts.run_color(2)
    assert charts.run_color(1) != charts.run_color(2) and charts.run_color(11) == charts.run_color(1)
    assert "base/b" in charts.legend_html(df) and charts.run_color(2) in charts.legend_html(df)


def test_smoothing_is_a_debiased_ema_per_run():
    df = pd.DataFrame({"run_id": [1, 1, 1, 2, 2], "segment": [1] * 5, "step": [0, 1, 2, 0, 1],
                       "value": [1.0, 2.0, 3.0, 10.0, 20.0]})
    out = charts.smooth(df, 0.5).tolist()
    assert out[0] == 1.0 and out[3] == 10.0  # debiased: the first point of each run is itself
    assert out[1] == pytest.approx((0.5 * 1 + 2) / 1.5)
    assert charts.smooth(df, 0.0).tolist() == df["value"].tolist()


def test_smoothing_runs_across_a_resume_on_the_newest_segments_values():
    """Defect: the EMA restarted at each resume segment, so a falling loss showed a drop at the resume line
    (the restarted EMA has no lag) while the raw loss was continuous."""
    loss = lambda step: 5.0 - step / 50
    seg1 = [(1, s, loss(s) + (0.5 if s >= 60 else 0.0)) for s in range(80)]  # steps 60..79: trained again by segment 2
    seg2 = [(2, s, loss(s)) for s in range(60, 120)]
    df = pd.DataFrame([{"run_id": 1, "segment": g, "step": s, "value": v} for g, s, v in seg1 + seg2])
    out = df.assign(smoothed=charts.smooth(df, 0.9))
    at = lambda seg, step: float(out[(out["segment"] == seg) & (out["step"] == step)]["smoothed"].iloc[0])
    assert at(2, 60) - at(1, 59) == pytest.approx(at(1, 59) - at(1, 58), abs=0.01)  # no jump at the resume
    # segment 2 continues the history it resumed from: segment 1 up to step 59, then its own points
    history = pd.Series([loss(s) for s in range(120)])
    assert at(2, 119) == pytest.approx(history.ewm(alpha=0.1, adjust=True).mean().iloc[-1])
    # segment 1's lost tail keeps its own EMA (what it showed before the crash)
    assert at(1, 79) == pytest.approx(pd.Series([v for _, _, v in seg1]).ewm(alpha=0.1, adjust=True).mean().iloc[-1])


# ---------------------------------------------------------------------- checkpoints and integrity


def test_checkpoint_states_worst_first():
    bad = Integrity("deep", False, (frames_problem := type("P", (), {"code": "crc_mismatch", "message": "bad crc"})(),))
    cases = {
        "missing": Ckpt(1, 1, missing=True, latest_integrity=Integrity("deep", True)),
        "incomplete": Ckpt(2, 2, complete=False),
        "problems": Ckpt(3, 3, latest_integrity=bad),
        "verified": Ckpt(4, 4, latest_integrity=Integrity("deep", True)),
        "quick_ok": Ckpt(5, 5, latest_integrity=Integrity("quick", True)),
        "unchecked": Ckpt(6, 6),
    }
    for want, c in cases.items():
        assert checkpoint_state(c) == want
    # one vocabulary: the app shows the registry's words and labels (the CLI prints the same labels)
    assert list(frames.CHECKPOINT_STATES) == list(CHECKPOINT_STATES) == list(cases)
    assert all(frames.CHECKPOINT_STATES[w].endswith(" " + label) for w, label in CHECKPOINT_STATES.items())
    df = frames.checkpoints_frame(cases.values(), {1: "base/d1"})
    row = df[df["state"] == "problems"].iloc[0]
    assert row["problems"] == "crc_mismatch" and "bad crc" in row["messages"] and frames_problem.code == "crc_mismatch"
    s = spec(charts.integrity_map(df))
    scale = s["encoding"]["color"]["scale"]
    assert dict(zip(scale["domain"], scale["range"]))[frames.CHECKPOINT_STATES["problems"]] == frames.STATE_COLORS["problems"]
    assert s["encoding"]["tooltip"]
    s = spec(charts.checkpoint_chart(df, charts.run_color(1)))
    assert {m["mark"]["type"] for m in s["layer"]} == {"line", "circle"}


def test_lr_chart_marks_the_resume_step():
    from nanochat.schedule import Schedule

    sched = Schedule(100, 10, 0.5, 0.1)
    lr = pd.DataFrame([{"step": s, "lr_multiplier": sched.lr_multiplier(s), "phase": sched.phase(s)} for s in range(0, 101, 5)])
    phases = pd.DataFrame([{"phase": "warmup", "start": 0, "end": 10}, {"phase": "constant", "start": 10, "end": 50},
                           {"phase": "warmdown", "start": 50, "end": 100}])
    s = spec(charts.lr_chart(lr, phases, 60, sched.lr_multiplier(60), reached_step=70))
    data = [d for d in s["datasets"].values()]
    mark = next(d for d in data if d and "label" in d[0])
    assert mark[0]["step"] == 60 and mark[0]["lr_multiplier"] == pytest.approx(sched.lr_multiplier(60))
    assert any(d and d[0].get("what", "").startswith("trained again") for d in data)


def test_diff_and_config_frames():
    d = ConfigDiff("a", "b", (DiffRow("model_config.n_layer", 2, 4, "changed"), DiffRow("seed", 42, 42, "same"),
                              DiffRow("x", None, 1.5, "only_b")))
    assert list(frames.diff_frame(d)["key"]) == ["model_config.n_layer", "x"]
    assert list(frames.diff_frame(d, changed_only=False)["status"]) == ["≠ changed", "= same", "only in B"]
    assert frames.config_frame({"total_batch_size": 524288})["value"].iloc[0] == "524,288"


@pytest.mark.parametrize("stand_in, entity", [(Run, RunSummary), (Point, MetricPoint), (Series, MetricSeries),
                                              (Integrity, IntegrityRecord), (Ckpt, CheckpointRecord)])
def test_stand_ins_only_use_fields_the_registry_entities_have(stand_in, entity):
    """The small stand-ins above keep these tests short; this keeps them honest if an entity changes."""
    properties = {name for name, v in vars(entity).items() if isinstance(v, property)}
    assert {f.name for f in fields(stand_in)} <= {f.name for f in fields(entity)} | properties


def test_run_names_tell_shared_labels_apart_by_machine_then_id():
    runs = [Run(1, "base/d20", origin="box-a"), Run(2, "base/d20", origin="box-b"), Run(3, "sft/d20", origin="box-a"),
            Run(4, "base/d4"), Run(5, "base/d4")]
    assert frames.run_names(runs) == {1: "base/d20 on box-a", 2: "base/d20 on box-b", 3: "sft/d20", 4: "base/d4 #4",
                                      5: "base/d4 #5"}


def test_compact_numbers():
    assert frames.compact(1_234_567) == "1.23M" and frames.compact(2.89e9) == "2.89B" and frames.compact(66) == "66"
    assert frames.compact(1.5e19) == "1.50e19" and frames.compact(None) == "—"


# ---------------------------------------------------------------------- generation traces


def A(token_id, model_prob, sampled_prob, kept):  # noqa: N802 (short constructors keep the table readable)
    return Alternative(token_id, model_prob, sampled_prob, kept)


def T(step, token_id, model_prob, sampled_prob, rank, forced, entropy, alternatives):  # noqa: N802
    return StepTrace(step, token_id, model_prob, sampled_prob, rank, forced, entropy, alternatives, watched=())


VOCAB = {1: "a", 2: " b", 3: "\n", 4: "<x>"}


def generation() -> traces.Generation:
    steps = (T(0, 2, 0.5, 0.6, 1, False, 1.0, (A(2, 0.5, 0.6, True), A(1, 0.3, 0.4, True), A(4, 0.1, 0.0, False))),
             T(1, 4, 0.1, 0.2, 3, True, 2.0, (A(2, 0.6, 0.7, True), A(1, 0.2, 0.3, True), A(4, 0.1, 0.0, False))),
             T(2, 3, 0.9, 1.0, 1, False, 0.5, (A(3, 0.9, 1.0, True), A(1, 0.05, 0.0, False), A(2, 0.01, 0.0, False))))
    row = RowResult(0, SamplingSettings(temperature=0.8, top_k=2), (2, 4, 3), " b<x>\n", "length", steps)
    return traces.from_row(row, VOCAB.get, forced=((1, 4),))


def test_alternatives_frame_for_the_generation_chart():
    gen = generation()
    df = traces.alternatives_frame(gen, 2)
    assert len(df) == 3 * 3 and list(df[df["step"] == 1]["row"]) == ["sampled", "#1", "#2"]
    sampled = df[df["row"] == "sampled"]
    assert list(sampled["token"]) == ["·b", "<x>", "↵"]  # whitespace made visible
    outlined = df[(df["row"] != "sampled") & df["is_sampled"]]
    assert list(zip(outlined["step"], outlined["row"])) == [(1, "#1"), (3, "#1")]  # step 2's token is not in its top 2
    s = spec(charts.generation_chart(df, selected_step=2))
    assert [p["name"] for p in s.get("params", []) + s["layer"][0].get("params", [])] == ["cell"]
    assert s["layer"][0]["encoding"]["color"]["condition"]["test"] == "datum.kept"
    assert "is_sampled" in s["layer"][0]["encoding"]["stroke"]["condition"][0]["test"] if isinstance(
        s["layer"][0]["encoding"]["stroke"]["condition"], list) else s["layer"][0]["encoding"]["stroke"]["condition"]["test"]
    assert spec(charts.entropy_chart(traces.steps_frame(gen)))["encoding"]["y"]["field"] == "entropy"


def test_distribution_frame_has_both_probabilities_and_filter_state():
    df = traces.distribution_frame(generation(), 2)
    assert len(df) == 6 and set(df["distribution"]) == {"model (T=1, unfiltered)", "sampling (after filters)"}
    filtered = df[~df["kept"]]
    assert set(filtered["token_id"]) == {1, 2} and (filtered[filtered["distribution"].str.startswith("sampling")]["prob"] == 0).all()
    assert spec(charts.distribution_chart(df))["encoding"]["yOffset"]["field"] == "distribution"


def test_text_statistics():
    assert traces.distinct_n([1, 2, 1, 2, 1], 2) == pytest.approx(2 / 4)
    assert traces.distinct_n([1], 2) is None
    assert traces.repeated_ngrams([1, 2, 3, 1, 2, 3, 1, 2, 3], 3) == 4  # (1,2,3) x3 -> 2 repeats, (2,3,1) x2, (3,1,2) x2
    assert traces.repeated_ngrams([1, 2, 3, 4], 3) == 0
    st = traces.stats(generation())
    assert st["tokens"] == 3 and st["mean_logprob"] == pytest.approx((math.log(0.5) + math.log(0.1) + math.log(0.9)) / 3)
    assert st["mean_entropy"] == pytest.approx(3.5 / 3) and st["distinct_2"] == 1.0


def test_shaded_html_escapes_and_marks_the_branch():
    out = traces.shaded_html(generation(), prompt="<b>Q</b>\n", since=1)
    assert "<b>Q</b>" not in out and "&lt;b&gt;Q&lt;/b&gt;<br>" in out
    assert "&lt;x&gt;" in out and "<x>" not in out
    assert out.count("border-bottom") == 2  # tokens from the branch step on are underlined
    assert "forced (branch)" in out
    assert traces.settings_label(SamplingSettings(temperature=0.8, seed=3)) == "T=0.8 · top-k off · top-p 1 · seed 3"


# ---------------------------------------------------------------------- which registry the app opens


def test_registry_target_precedence(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    env = {"NANOCHAT_REGISTRY_URL": str(tmp_path / "env.sqlite"), "NANOCHAT_BASE_DIR": str(base)}
    t = registry_target(["--db", "postgresql+psycopg://u@h/db"], env)
    assert (t.url, t.source, t.problem) == ("postgresql+psycopg://u@h/db", "--db", None)
    t = registry_target(["--base-dir", str(base)], env)
    assert (t.url, t.scan_default, t.problem) == (str(base / "registry.sqlite"), str(base), None)
    t = registry_target([], env)
    assert t.url == str(tmp_path / "env.sqlite") and t.source == "$NANOCHAT_REGISTRY_URL"
    t = registry_target([], {"NANOCHAT_BASE_DIR": str(base)})
    assert t.url == str(base / "registry.sqlite") and t.scan_default == str(base)
    t = registry_target([], {})
    assert t.url == str(DEMO_DIR / "registry.sqlite") and t.source == "demo"
    assert t.problem is None or "make app" in t.problem


def test_the_app_and_the_cli_resolve_the_registry_by_one_rule(tmp_path, monkeypatch):
    from registry import db as regdb

    base = tmp_path / "base"
    base.mkdir()
    url_env = {"NANOCHAT_REGISTRY_URL": str(tmp_path / "env.sqlite")}
    for env in (url_env, {"NANOCHAT_BASE_DIR": str(base)}, {**url_env, "NANOCHAT_BASE_DIR": str(base)}):
        assert registry_target([], env) == regdb.locate(environ=env)
        for name in ("NANOCHAT_REGISTRY_URL", "NANOCHAT_BASE_DIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        assert regdb.default_url() == registry_target([], env).url  # what the CLI opens without --db
    assert registry_target(["--db", "x.sqlite"], url_env) == regdb.locate(db="x.sqlite", environ=url_env)
    # only the default differs: the app's is the demo, the CLI's is nanochat's base dir
    assert regdb.locate(environ={}).url == str(Path("~/.cache/nanochat/registry.sqlite").expanduser())


def test_registry_target_bad_arguments_are_problems_not_exceptions(tmp_path):
    assert "does not exist" in registry_target(["--base-dir", str(tmp_path / "nope")], {}).problem
    assert "unknown app argument" in registry_target(["--bogus"], {}).problem
    assert "needs a value" in registry_target(["--db"], {}).problem
    assert "does not exist" in registry_target([], {"NANOCHAT_BASE_DIR": str(tmp_path / "gone")}).problem
    assert "does not exist" in registry_target(["--db", str(tmp_path / "no" / "dir" / "r.sqlite")], {}).problem

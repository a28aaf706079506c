"""Every page of the Streamlit app under streamlit.testing.v1.AppTest, on the demo registry (the shared
`demo_base` fixture: three tiny real runs, one SIGKILLed and resumed) or on small real trees copied from
it: each page renders without an exception and its main interaction works (scan, select runs, run a
check, generate, branch, compare), and bad input gives a message, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "streamlit_app" / "app.py"
TIMEOUT = 60  # the Generate and Compare pages import torch and load a model on their first run


# ---------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def fresh_caches(monkeypatch):
    """st caches survive between AppTests in one process: every test starts cold, and no ambient registry."""
    st.cache_data.clear()
    st.cache_resource.clear()
    for name in ("NANOCHAT_REGISTRY_URL", "NANOCHAT_BASE_DIR"):
        monkeypatch.delenv(name, raising=False)
    yield
    st.cache_data.clear()
    st.cache_resource.clear()


def copy_registry(demo_base: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in demo_base.glob("registry.sqlite*"):
        shutil.copy(f, dst / f.name)
    return dst / "registry.sqlite"


@pytest.fixture
def registry(demo_base, tmp_path, monkeypatch) -> Path:
    """A private copy of the demo registry (pointing at the read-only demo files), opened by the app."""
    url = copy_registry(demo_base, tmp_path / "reg")
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(url))
    return url


@pytest.fixture
def own_base(demo_base, tmp_path, monkeypatch) -> Path:
    """A writable base dir with the demo's tokenizer and two of its runs, indexed into a fresh registry."""
    base = tmp_path / "base"
    shutil.copytree(demo_base / "tokenizer", base / "tokenizer")
    for tag in ("d1", "d2-crash"):
        shutil.copytree(demo_base / "base_checkpoints" / tag, base / "base_checkpoints" / tag)
    from registry import open_store

    with open_store(base / "registry.sqlite") as s:
        s.scan(base)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(base / "registry.sqlite"))
    return base


def open_app(page: str | None = None, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if page is None:
        for k, v in (query or {}).items():
            at.query_params[k] = v
    at.run()
    if page is not None:
        at.switch_page(f"app_pages/{page}.py")
        for k, v in (query or {}).items():
            at.query_params[k] = v
        at.run()
    assert_clean(at)
    return at


def assert_clean(at: AppTest) -> None:
    assert not at.exception, [e.message for e in at.exception]


def charts(at: AppTest) -> list[tuple[dict, list[pd.DataFrame]]]:
    """(spec, datasets) of every Altair chart on the page."""
    out = []
    for c in at.get("vega_lite_chart"):
        data = [pa.ipc.open_stream(d.data.data).read_all().to_pandas() for d in c.proto.datasets]
        out.append((json.loads(c.proto.spec), data))
    return out


def metric(at: AppTest, label: str):
    return next(m for m in at.metric if m.label == label)


def texts(at: AppTest) -> str:
    return "\n".join(str(m.value) for m in list(at.markdown) + list(at.caption))


# ---------------------------------------------------------------------- registry selection and empty states


def test_app_shows_how_to_start_when_there_is_no_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "nowhere"))
    at = open_app()
    assert any("does not exist" in e.value for e in at.error)


def test_a_file_that_is_not_a_registry_is_an_error_not_a_traceback(tmp_path, monkeypatch):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("not a database at all\n" * 100)
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(bad))
    for page in (None, "checkpoints", "generate"):
        at = open_app(page)
        assert at.error, page


def test_empty_registry_teaches_scan_and_the_scan_fills_it(demo_base, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_REGISTRY_URL", str(tmp_path / "registry.sqlite"))
    at = open_app()
    assert any("No runs in this registry yet" in i.value for i in at.info)
    at.text_input(key="empty_scan_path").set_value(str(tmp_path / "does-not-exist"))
    at.button(key="empty_scan_go").click().run()
    assert_clean(at)
    assert any("does not exist" in e.value for e in at.error)
    at.text_input(key="empty_scan_path").set_value(str(demo_base))
    at.button(key="empty_scan_go").click().run()
    assert_clean(at)
    assert any("4 runs (4 new)" in s.value for s in at.success)  # three base runs and the SFT run
    assert metric(at, "Runs").value == "4"
    assert len(at.dataframe[0].value) == 4


def test_every_cached_registry_read_is_cleared_after_a_write(monkeypatch):
    """A read cached with plain st.cache_data would stay stale after a scan: every cached function of data.py
    whose first argument is the registry URL must be a @registry_read, and a write clears each of them (and
    no model or generation)."""
    import ast
    import inspect

    from streamlit_app import data

    tree = ast.parse(inspect.getsource(data))
    cached, reads = set(), set()
    for fn in tree.body:
        if not isinstance(fn, ast.FunctionDef) or not fn.decorator_list:
            continue
        decorators = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in fn.decorator_list}
        first = fn.args.args[0].arg if fn.args.args else None
        if decorators & {"st.cache_data", "registry_read"}:
            cached.add(fn.name)
        if "registry_read" in decorators:
            reads.add(fn.name)
        elif "st.cache_data" in decorators:
            assert first != "url", f"data.{fn.name} reads the registry: decorate it with @registry_read"
    assert {"summary", "runs", "metrics", "checkpoints_table", "all_checkpoints", "resume_plan"} <= reads
    cleared = []
    for name in cached:
        monkeypatch.setattr(getattr(data, name), "clear", lambda name=name: cleared.append(name))
    data.clear_registry_caches()
    assert sorted(cleared) == sorted(reads) and "generate" not in cleared


# ---------------------------------------------------------------------- Runs


def test_runs_page_answers_first_and_plots_the_newest_run(registry):
    at = open_app()
    assert metric(at, "Runs").value == "4"
    assert metric(at, "Checkpoints").value == "11"
    table = at.dataframe[0].value
    assert set(table["run"]) == {"base/d1", "base/d2", "base/d2-crash", "sft/d2"}
    newest = table.iloc[0]
    assert at.multiselect(key="runs").value == [int(newest["id"])]
    (val_spec, val_data), (loss_spec, loss_data) = charts(at)[:2]
    assert set(val_data[0]["run"]) == {newest["run"]} and set(val_data[0]["key"]) == {"val_bpb"}
    assert "log" not in json.dumps(loss_spec["layer"][0]["encoding"]["y"].get("scale", {}))
    assert all(layer["encoding"].get("tooltip") for layer in loss_spec["layer"] if layer["mark"]["type"] != "text")


def test_runs_page_selects_runs_axes_smoothing_and_log_scale(registry):
    at = open_app()
    ids = {n: i for i, n in zip(at.dataframe[0].value["id"], at.dataframe[0].value["run"])}
    at.multiselect(key="runs").set_value([ids["base/d2"], ids["base/d2-crash"]])
    at.segmented_control(key="x").set_value("tokens")
    at.slider(key="ema").set_value(0.0)
    at.toggle(key="log").set_value(True).run()
    assert_clean(at)
    (val_spec, val_data), (loss_spec, loss_data) = charts(at)[:2]
    points = loss_data[0]
    assert set(points["run"]) == {"base/d2", "base/d2-crash"}
    assert (points["x"] == points["tokens"]).all() and (points["tokens"] == points["step"] * 512).all()
    assert loss_spec["layer"][0]["encoding"]["y"]["scale"]["type"] == "log"
    assert (points["smoothed"] == points["value"]).all()  # EMA 0 = raw
    # the resumed run: its second segment is its own line, and a dashed rule marks where it starts
    crash = points[points["run"] == "base/d2-crash"]
    assert set(crash["segment"]) == {1, 2}
    rules = [d for d in loss_data[1:] if "segment" in d and (d["segment"] == 2).any()]
    assert rules and int(rules[0]["step"].iloc[0]) == int(crash[crash["segment"] == 2]["step"].min())


def test_runs_page_charts_the_metrics_the_user_picks(registry):
    at = open_app(query={"runs": ["base/d2-crash"]})
    picker = at.multiselect(key="metrics")
    assert picker.value == ["val_bpb", "train_loss"]
    assert {"LR multiplier", "throughput", "step time"} <= set(picker.options)
    picker.set_value(["lrm", "tok_per_sec", "dt_ms"]).run()
    assert_clean(at)
    drawn = {data[0]["key"].iloc[0]: data[0] for _, data in charts(at) if data and "key" in data[0]}
    assert sorted(drawn) == ["dt_ms", "lrm", "tok_per_sec"] and all(set(d["key"]) == {k} for k, d in drawn.items())
    # the LR multiplier is a schedule, not smoothed; throughput is
    lrm, tps = drawn["lrm"], drawn["tok_per_sec"]
    assert (lrm["smoothed"] == lrm["value"]).all() and not (tps["smoothed"] == tps["value"]).all()
    at = open_app(query={"runs": ["base/d2-crash"], "metrics": ["step time"]})  # the URL carries the names
    assert [set(data[0]["key"]) for _, data in charts(at) if data and "key" in data[0]] == [{"dt_ms"}]


def test_runs_page_view_comes_from_the_url(registry):
    at = open_app(query={"runs": ["base/d2-crash", "base/d1"], "x": "wall time", "ema": "0.9"})
    names = dict(zip(at.dataframe[0].value["id"], at.dataframe[0].value["run"]))
    assert sorted(names[i] for i in at.multiselect(key="runs").value) == ["base/d1", "base/d2-crash"]
    assert at.segmented_control(key="x").value == "time"
    assert at.slider(key="ema").value == pytest.approx(0.9)
    spec, _ = charts(at)[1]
    assert "wall time" in spec["layer"][0]["encoding"]["x"]["title"]


def test_runs_page_live_refresh_shows_new_metric_lines(own_base):
    at = open_app(query={"runs": ["base/d1"]})
    at.toggle(key="live").set_value(True).run()
    assert_clean(at)
    before = charts(at)[1][1][0]
    metrics = own_base / "base_checkpoints" / "d1" / "metrics.jsonl"
    with open(metrics, "a", encoding="utf-8") as f:  # the trainer appends a step
        f.write(json.dumps({"step": 40, "segment": 1, "wall_time": 2e9, "train_loss": 1.25}) + "\n")
    at.run()
    assert_clean(at)
    after = charts(at)[1][1][0]
    assert 40 not in set(before["step"]) and after[after["step"] == 40]["value"].tolist() == [1.25]


# ---------------------------------------------------------------------- Checkpoints


def test_checkpoints_page_history_detail_and_diff(registry):
    at = open_app("checkpoints", {"run": "base/d2-crash"})
    assert at.selectbox(key="run").value is not None
    table = at.dataframe[0].value
    assert sorted(table["step"]) == [4, 8, 12]
    assert metric(at, "Checkpoints on disk").value == "3"
    spec, data = charts(at)[0]
    assert sorted(data[0]["step"]) == [4, 8, 12]
    # details of the selected checkpoint: files with sizes
    files = next(df.value for df in at.dataframe if "file" in df.value.columns)
    assert {"model", "meta"} <= {k.split(" ")[0] for k in files["kind"]}
    # diff of two checkpoints: the step and val_bpb differ
    diff = at.dataframe[-1].value
    assert {"step", "val_bpb"} <= set(diff["key"])
    # filter by step range
    at.slider(key="steps").set_value((8, 12)).run()
    assert_clean(at)
    assert sorted(at.dataframe[0].value["step"]) == [8, 12]
    # diff of two runs
    at.segmented_control(key="diff").set_value("runs").run()
    assert_clean(at)
    assert "run" in texts(at) or at.dataframe[-1].value is not None


def test_checkpoints_filter_follows_the_run_when_its_states_differ(own_base):
    """Defect: the integrity filter remembered run A's states; run B's were all filtered out ("0 of 3 shown")
    while every pill of B still looked selected."""
    from registry import open_store, verify

    with open_store(own_base / "registry.sqlite") as s:
        verify.verify(s, "d2-crash")  # d2-crash: quick-checked; d1: never checked
    at = open_app("checkpoints", {"run": "base/d1"})
    assert sorted(at.dataframe[0].value["step"]) == [4, 8, 12]
    at.selectbox(key="run").select_index(at.selectbox(key="run").options.index("base/d2-crash")).run()
    assert_clean(at)
    assert sorted(at.dataframe[0].value["step"]) == [4, 8, 12]
    assert "3 of 3 checkpoints shown" in texts(at)


def test_checkpoints_integrity_tile_says_not_verified_yet(registry):
    at = open_app("checkpoints", {"run": "base/d2"})
    tile = metric(at, "Integrity")
    assert tile.value == "not verified yet" and "0 of 3" in tile.delta


def test_a_checkpoint_deleted_since_it_was_indexed(own_base):
    (own_base / "base_checkpoints" / "d1" / "model_000012.pt").unlink()
    at = open_app("checkpoints", {"run": "base/d1"})
    assert any("no longer on disk" in w.value for w in at.warning)
    at = open_app("generate", {"run": "base/d1"})
    assert any("rescan" in e.value.lower() for e in at.error), [e.value for e in at.error]


# ---------------------------------------------------------------------- Resume


def test_resume_page_reports_the_plan_and_the_command(registry, demo_base):
    at = open_app("resume", {"run": "base/d2-crash"})
    assert metric(at, "Resume from step").value == "12"
    assert metric(at, "Resume").value.endswith("exact")
    code = at.code[0].value
    assert "--resume-from-step=12" in code and "--model-tag=d2-crash" in code
    assert f"NANOCHAT_BASE_DIR={demo_base}" in code
    spec, data = charts(at)[0]
    lr = next(d for d in data if "lr_multiplier" in d and len(d) > 3)
    assert lr["lr_multiplier"].max() == pytest.approx(1.0)
    # another target: the command passes --num-iterations and a warning says the schedule moves
    at.number_input(key="target").set_value(24).run()
    assert_clean(at)
    assert "--num-iterations=24" in at.code[0].value
    assert metric(at, "Remaining steps").value == "12"


def test_resume_page_refuses_a_target_below_the_resume_step(registry):
    at = open_app("resume", {"run": "base/d2-crash", "target": "3"})
    # it used to plan "12 of 3 steps" with a negative LR multiplier and --num-iterations=3 --resume-from-step=12
    assert [e.value for e in at.error] == ["target 3 steps is below the resume step 12: the run has already trained "
                                           "12 steps; ask for 12 or more (the run's own target is 12)"]
    assert not at.code and not at.metric


def test_resume_page_first_case_is_the_crash_and_the_deep_check_says_it_ran(registry):
    at = open_app("resume")
    names = {v: k for k, v in enumerate(at.selectbox(key="run").options)}
    assert at.selectbox(key="run").value is not None and "base/d1" in names
    assert metric(at, "Resume from step").value == "12"  # d1: killed after step 13, its last checkpoint 12
    assert "ETA" in metric(at, "Remaining steps").delta
    assert any("training had reached step" in w.value for w in at.warning)
    at.button[[b.label for b in at.button].index("Deep-check and plan")].click().run()
    assert_clean(at)
    assert any(s.value.startswith("Deep check done: step 12") for s in at.success)
    # a new target moves the schedule: the run's own schedule is drawn too, with the jump at the resume step
    at.number_input(key="target").set_value(40).run()
    assert_clean(at)
    spec, data = charts(at)[0]
    assert any("LR jump" in str(d.get("label", pd.Series()).tolist()) for d in data if "label" in d)
    assert "dashed grey" in texts(at)


def test_resume_page_skips_a_broken_newest_checkpoint(own_base):
    (own_base / "base_checkpoints" / "d2-crash" / "optim_000012_rank0.pt").unlink()
    at = open_app("resume", {"run": "base/d2-crash"})
    assert metric(at, "Resume from step").value == "8"
    assert any("step 12" in w.value and "missing_optimizer_shard" in w.value for w in at.warning)


# ---------------------------------------------------------------------- Integrity


def test_integrity_page_runs_quick_checks_on_everything(registry):
    at = open_app("integrity")
    assert metric(at, "Not checked yet").value == "11"  # 3 + 3 + 3 base checkpoints and the SFT run's 2
    at.button[0].click().run()
    assert_clean(at)
    assert any("all 11 checkpoints passed" in s.value for s in at.success)
    assert metric(at, "Passed").value == "11"
    history = next(df.value for df in at.dataframe if "duration_s" in df.value.columns)
    assert list(history["level"]) == ["quick"] and list(history["result"]) == ["✓ ok"]


def test_integrity_deep_check_reports_a_flipped_byte(own_base):
    model = own_base / "base_checkpoints" / "d1" / "model_000008.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    at = open_app("integrity", {"run": "base/d1", "level": "deep"})
    at.button[0].click().run()
    assert_clean(at)
    assert any("1 of 3 checkpoints have problems" in w.value for w in at.warning)
    problems = at.dataframe[0].value
    assert list(problems["step"]) == [8] and "crc_mismatch" in problems["problems"].iloc[0]
    assert metric(at, "With problems").value == "1"


# ---------------------------------------------------------------------- Generate


def test_generate_page_generates_and_branches(registry, monkeypatch):
    from nanochat import checkpoint_manager
    from nanochat.engine import Engine
    from nanochat.sampling import SamplingSettings

    loads, asked = [], []
    real_load, real_generate = checkpoint_manager.load_model, Engine.generate
    monkeypatch.setattr(checkpoint_manager, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    monkeypatch.setattr(Engine, "generate", lambda self, ids, settings, *a, **kw: asked.append(settings)
                        or real_generate(self, ids, settings, *a, **kw))
    at = open_app("generate", {"run": "base/d2", "n": "12", "prompt": "KING HENRY.", "t": "0.7", "k": "40", "p": "0.95",
                               "seed": "7"})
    # every setting reaches the engine under its own name, from the URL through data.generate
    assert asked == [SamplingSettings(temperature=0.7, top_k=40, top_p=0.95, min_p=0.0, seed=7)]
    assert metric(at, "Generated").value == "12 tokens"
    assert any("Main generation" in m.value for m in at.markdown)
    grid = next(data[0] for spec, data in charts(at) if "row" in data[0])
    assert set(grid["step"]) == set(range(1, 13)) and (grid[grid["row"] == "sampled"]["is_sampled"]).all()
    # branch at step 3 with the first alternative
    at.number_input(key="gen_step").set_value(3).run()
    alt_radio = at.radio(key="gen_alt_3")
    chosen = alt_radio.options[1]
    alt_radio.set_value(1)
    at.button[[b.label for b in at.button].index("Branch from here")].click().run()
    assert_clean(at)
    assert at.radio(key="view").value == "branch 1"
    headers = [m.value for m in at.markdown if m.value.startswith("**")]
    assert any(h.startswith("**Main generation") for h in headers) and any(h.startswith("**Branch 1") for h in headers)
    branch_grid = next(data[0] for spec, data in charts(at) if "row" in data[0])
    sampled = branch_grid[branch_grid["row"] == "sampled"].set_index("step")
    assert bool(sampled.loc[3, "forced"]) and sampled.loc[3, "token"] in chosen
    # the branch keeps the main generation's first two tokens
    assert list(sampled.loc[[1, 2], "token"]) == list(grid[grid["row"] == "sampled"].set_index("step").loc[[1, 2], "token"])
    assert len(loads) == 1  # three script runs, one model load (st.cache_resource)


def test_generate_page_shading_and_probabilities_in_the_grid(registry):
    at = open_app("generate", {"run": "base/d2", "n": "8", "prompt": "KING HENRY."})
    grid_spec = next(spec for spec, data in charts(at) if "row" in data[0])
    assert "blues" in json.dumps(grid_spec) and len(grid_spec["layer"]) == 3  # cells, tokens, the selected step
    at.segmented_control(key="shade").set_value("surprise")
    at.toggle(key="show_p").set_value(True).run()
    assert_clean(at)
    grid_spec, grid = next((spec, data[0]) for spec, data in charts(at) if "row" in data[0])
    assert "reds" in json.dumps(grid_spec) and "surprise_bits" in json.dumps(grid_spec)
    assert any(layer.get("encoding", {}).get("text", {}).get("field") == "p_label" for layer in grid_spec["layer"])
    assert set(grid["p_label"]) and all(p.endswith("%") or p in ("0", "<1%") for p in grid["p_label"])
    assert any("more surprising" in c.value for c in at.caption)


def test_generate_page_refuses_bad_input_with_a_message(registry):
    at = open_app("generate", {"run": "base/d2", "prompt": "word " * 200})
    assert any("context" in e.value for e in at.error), [e.value for e in at.error]
    at.text_area(key="prompt").set_value("   ").run()
    assert_clean(at)
    assert any("Type a prompt" in i.value for i in at.info)


def test_generate_page_without_the_tokenizer_or_with_the_wrong_one(own_base):
    shutil.rmtree(own_base / "tokenizer")
    at = open_app("generate", {"run": "base/d1"})
    assert any("tokenizer" in e.value.lower() and "tokenizer/" in e.value for e in at.error), [e.value for e in at.error]
    from tests.modelkit import tiny_tokenizer

    tiny_tokenizer(300).save(own_base / "tokenizer")  # a tokenizer, but not the one the run was trained with
    st.cache_data.clear()
    st.cache_resource.clear()
    at = open_app("generate", {"run": "base/d1"})
    assert any("wrong tokenizer" in e.value and "trained with" in e.value for e in at.error), [e.value for e in at.error]


# ---------------------------------------------------------------------- Compare


def test_compare_grid_is_one_batched_call_and_reproducible(registry, monkeypatch):
    from nanochat.engine import Engine

    calls = []
    real = Engine.generate

    def counting(self, prompt_ids, settings, *a, **kw):
        calls.append(len(settings) if isinstance(settings, list) else 1)
        rows.append(settings)
        return real(self, prompt_ids, settings, *a, **kw)

    rows = []
    monkeypatch.setattr(Engine, "generate", counting)
    at = open_app("compare", {"temps": "0.5, 0.9", "seeds": "1 2", "n": "16"})
    assert calls == [4]
    assert [(s.temperature, s.top_k, s.top_p, s.seed) for s in rows[0]] == \
        [(t, 50, 1.0, seed) for t in (0.5, 0.9) for seed in (1, 2)]  # the grid reaches the engine by name
    assert metric(at, "Columns").value == "4"
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert cards == ["**#1**", "**#2**", "**#3**", "**#4**"]
    # laid out as the grid it is: a row per temperature, a column per seed, each with its header
    headers = [m.value for m in at.markdown if m.value.startswith("**") and not m.value.startswith("**#")]
    assert headers[:2] == ["**seed 1**", "**seed 2**"] and "**T=0.5**" in headers and "**T=0.9**" in headers
    assert headers.index("**T=0.5**") < headers.index("**T=0.9**")
    assert any("Every column: top-k 50 · top-p 1" in c.value for c in at.caption)
    html = [m.value for m in at.markdown if m.value.startswith("<div")]
    alone = html[3]  # row T=0.9, column seed 2
    # the same setting and seed alone in a grid gives the same column
    at.text_input(key="temps").set_value("0.9")
    at.text_input(key="seeds").set_value("2").run()
    assert_clean(at)
    assert calls[-1] == 1
    assert [m.value for m in at.markdown if m.value.startswith("<div")] == [alone]
    stats = at.dataframe[0].value
    assert {"mean_logprob", "mean_entropy", "distinct_2", "repeated_3grams"} <= set(stats.columns)


def test_the_model_stays_loaded_across_pages(registry, monkeypatch):
    from nanochat import checkpoint_manager

    loads = []
    real_load = checkpoint_manager.load_model
    monkeypatch.setattr(checkpoint_manager, "load_model", lambda *a, **kw: loads.append(a) or real_load(*a, **kw))
    open_app("generate", {"run": "base/d2", "n": "4"})
    open_app("compare", {"ckpt": "base/d2 @ step 12", "n": "8"})
    assert len(loads) == 1  # one st.cache_resource entry per checkpoint file, shared by both pages


def test_compare_checkpoints_mode_and_bad_values(registry):
    at = open_app("compare", {"mode": "checkpoints", "ckpts": ["base/d2 @ step 12", "base/d1 @ step 4", "base/d1 @ step 8"]})
    assert metric(at, "Columns").value == "3"
    cards = [m.value for m in at.markdown if m.value.startswith("**#")]
    assert [c.split(" · ")[1] for c in cards] == ["base/d1 @ step 4", "base/d1 @ step 8", "base/d2 @ step 12"]  # by step
    at = open_app("compare", {"temps": "warm"})
    assert any("not a number" in e.value for e in at.error)
    at = open_app("compare", {"topp": "1.5"})
    assert any("top_p" in e.value for e in at.error), [e.value for e in at.error]


# ---------------------------------------------------------------------- Model calculator


def test_calculator_matches_what_a_run_recorded(registry):
    at = open_app("calculator")
    assert metric(at, "Parameters").value.endswith("M")
    pick = at.selectbox(key="from_run")
    pick.select_index(pick.options.index("base/d2")).run()
    assert_clean(at)
    assert any("Matches what base/d2 recorded" in s.value for s in at.success), [w.value for w in at.warning]
    assert metric(at, "Training run").value == "12 steps"
    at.slider(key="depth").set_value(3).run()
    assert any("Differs from what base/d2 recorded" in w.value for w in at.warning)


def test_scan_box_imports_an_upstream_log_and_checkpoints_show_its_evaluations(own_base):
    run = own_base / "base_checkpoints" / "d1"
    log = own_base / "logs" / "base_train.log"
    log.parent.mkdir()
    log.write_text("Distributed world size: 1\n"
                   "step 00011/00012 (91.67%) | loss: 5.100000 | lrm: 0.30 | dt: 47.10ms | tok/sec: 43,478 | bf16_mfu: 0.00\n"
                   "Evaluating: arc_easy (10-shot, type: multiple_choice)... accuracy: 0.5105 | centered: 0.3474 | time: 1.00s\n"
                   "Step 00012 | CORE metric: 0.3474\n"
                   f"2026-11-24 06:24:02,880 - nanochat.checkpoint_manager - INFO - Saved model parameters to: {run}/model_000012.pt\n")
    at = open_app("runs")
    at.text_input(key="scan_path").set_value(str(log))
    at.button(key="scan_go").click().run()
    assert_clean(at)
    assert any("Imported base_train.log into base/d1" in s.value and "3 new evaluations" in s.value for s in at.success), \
        [s.value for s in at.success]
    at = open_app("checkpoints", {"run": "base/d1"})  # its newest checkpoint, step 12, is shown
    evals = next(df.value for df in at.dataframe if "evaluation" in df.value.columns)
    assert dict(zip(evals["evaluation"], evals["value"])) == {"CORE:core": 0.3474, "arc_easy:accuracy": 0.5105,
                                                              "arc_easy:centered": 0.3474}


def test_calculator_classic_mode_marks_depths_classic_cannot_build(registry):
    at = open_app("calculator")
    at.button_group(key="gen").set_value("classic").run()
    assert_clean(at)  # the depth sweep used to end in "ArchitectureError: n_embd 576 is not divisible by n_head 5"
    assert metric(at, "Parameters").value.endswith("M")
    assert any("Not drawn: depth 9" in c.value for c in at.caption), [c.value for c in at.caption]

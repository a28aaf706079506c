"""
The app's entry point: page configuration, navigation (st.navigation over app_pages/) and the sidebar
that says which registry is open.

    streamlit run streamlit_app/app.py                      # $NANOCHAT_REGISTRY_URL / $NANOCHAT_BASE_DIR, else the demo
    streamlit run streamlit_app/app.py -- --base-dir DIR    # DIR/registry.sqlite, scans default to DIR
    streamlit run streamlit_app/app.py -- --db URL          # any registry (SQLite path or postgresql+psycopg://)

It does no work of its own: pages read their widgets, call `data.py` and render. Importing this module
never imports torch (only the Generate, Compare, Chat and Attention pages load models, through `data.py`).

Local only: `.streamlit/config.toml` beside this file (Streamlit reads it from the script's folder, whatever
the working directory) binds 127.0.0.1 and turns usage statistics off; when a flag, an environment variable
or another config file overrides that, the app refuses to serve its pages (`exposure_problem`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `streamlit run` puts only this folder on sys.path
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from registry.errors import RegistryError  # noqa: E402
from streamlit_app import data, frames  # noqa: E402

HERE = Path(__file__).resolve().parent
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def exposure_problem(argv: list[str], option) -> str | None:
    """Why this server is not local-only (listening beyond loopback, or sending usage statistics), or None.
    Only for `streamlit run` of this file (argv[0]); `option` is st.get_option."""
    if not argv or Path(argv[0]).resolve() != HERE / "app.py":
        return None  # AppTest and imports: no server of ours
    address = option("server.address")
    if address not in LOOPBACK:
        return (f"server.address is {address or 'unset (all interfaces)'}: this app serves your runs on 127.0.0.1 only. "
                "Remove the --server.address flag, STREAMLIT_SERVER_ADDRESS or the [server] address of your own "
                "config.toml, and reach a remote machine through an SSH tunnel (ssh -L 8501:127.0.0.1:8501 HOST).")
    if option("browser.gatherUsageStats"):
        return ("browser.gatherUsageStats is on: this app sends nothing off the machine. Remove the flag, "
                "STREAMLIT_BROWSER_GATHER_USAGE_STATS or the setting in your own config.toml.")
    return None


def pages() -> dict[str, list]:
    page = lambda file, title, icon, path, **kw: st.Page(HERE / "app_pages" / file, title=title, icon=f":material/{icon}:",
                                                         url_path=path, **kw)
    return {
        "Training": [page("runs.py", "Runs", "monitoring", "runs", default=True),
                     page("checkpoints.py", "Checkpoints", "inventory_2", "checkpoints"),
                     page("resume.py", "Resume", "restart_alt", "resume"),
                     page("integrity.py", "Integrity", "verified_user", "integrity")],
        "Sampling": [page("generate.py", "Generate", "auto_awesome", "generate"),
                     page("compare.py", "Compare", "view_column", "compare")],
        "Data": [page("tokenizer.py", "Tokenizer", "text_fields", "tokenizer"),
                 page("dataset.py", "Dataset", "dataset", "dataset")],
        "Chat": [page("chat.py", "Chat", "chat", "chat"),
                 page("conversations.py", "Conversation builder", "forum", "builder")],
        "Inside the model": [page("attention.py", "Attention", "grid_view", "attention")],
        "Planning": [page("calculator.py", "Model calculator", "calculate", "calculator"),
                     page("lr_finder.py", "LR finder", "speed", "lr-finder"),
                     page("sweeps.py", "Sweeps", "stacked_line_chart", "sweeps")],
    }


def sidebar() -> None:
    target = data.registry_target()
    with st.sidebar:
        st.markdown("**Registry**")
        if target.problem:
            st.error(target.problem, icon=":material/folder_off:")
            return
        st.caption(f"`{target.url}`  \nfrom {target.source}")
        try:
            s = data.summary(target.url)
        except RegistryError as e:
            st.error(str(e), icon=":material/error:")
            return
        by = s.runs_by_status
        training = f" · {by['training']} training" if by.get("training") else ""
        last = frames.age(s.last_scan.finished_at) if s.last_scan else "never"
        st.caption(f"{s.runs} runs{training} · {s.checkpoints:,} checkpoints · {s.metric_points:,} metric points · "
                   f"last scan {last}")
        if st.button("Reload", icon=":material/refresh:", help="Re-read the registry now (reads are cached for a few seconds)"):
            data.clear_registry_caches()
            st.rerun()


def main() -> None:
    # a local favicon: with none, the browser fetches each page's material icon from fonts.gstatic.com
    st.set_page_config(page_title="nanochat workbench", page_icon=str(HERE / "favicon.png"), layout="wide")
    problem = exposure_problem(sys.argv, st.get_option)
    if problem:
        st.error(f"Not serving: {problem}", icon=":material/public_off:")
        st.stop()
    page = st.navigation(pages())
    sidebar()
    page.run()


if __name__ == "__main__":  # `streamlit run` (and AppTest) run this file as __main__; importing it does nothing
    main()

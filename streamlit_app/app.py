"""
The app's entry point: page configuration, navigation (st.navigation over app_pages/) and the sidebar
that says which registry is open.

    streamlit run streamlit_app/app.py                      # $NANOCHAT_REGISTRY_URL / $NANOCHAT_BASE_DIR, else the demo
    streamlit run streamlit_app/app.py -- --base-dir DIR    # DIR/registry.sqlite, scans default to DIR
    streamlit run streamlit_app/app.py -- --db URL          # any registry (SQLite path or postgresql+psycopg://)

It does no work of its own: pages read their widgets, call `data.py` and render. Importing this module
never imports torch (only the Generate, Compare and Chat pages load models, through `data.py`).
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
    page = st.navigation(pages())
    sidebar()
    page.run()


if __name__ == "__main__":  # `streamlit run` (and AppTest) run this file as __main__; importing it does nothing
    main()

"""
The app's entry point: page configuration, navigation (st.navigation over app_pages/) and the sidebar
that says which registry is open.

    streamlit run streamlit_app/app.py                      # $NANOCHAT_REGISTRY_URL / $NANOCHAT_BASE_DIR, else the demo
    streamlit run streamlit_app/app.py -- --base-dir DIR    # DIR/registry.sqlite, scans default to DIR
    streamlit run streamlit_app/app.py -- --db URL          # any registry (SQLite path or postgresql+psycopg://)

It does no work of its own: pages read their widgets, call `data.py` and render. Importing this module
never imports torch (only the Generate and Compare pages load models, through `data.py`).
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
PAGES = {
    "Training": [
        st.Page(HERE / "app_pages/runs.py", title="Runs", icon=":material/monitoring:", url_path="runs", default=True),
        st.Page(HERE / "app_pages/checkpoints.py", title="Checkpoints", icon=":material/inventory_2:", url_path="checkpoints"),
        st.Page(HERE / "app_pages/resume.py", title="Resume", icon=":material/restart_alt:", url_path="resume"),
        st.Page(HERE / "app_pages/integrity.py", title="Integrity", icon=":material/verified_user:", url_path="integrity"),
    ],
    "Sampling": [
        st.Page(HERE / "app_pages/generate.py", title="Generate", icon=":material/auto_awesome:", url_path="generate"),
        st.Page(HERE / "app_pages/compare.py", title="Compare", icon=":material/view_column:", url_path="compare"),
    ],
    "Planning": [
        st.Page(HERE / "app_pages/calculator.py", title="Model calculator", icon=":material/calculate:", url_path="calculator"),
    ],
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


st.set_page_config(page_title="nanochat workbench", page_icon=":material/science:", layout="wide")
page = st.navigation(PAGES)
sidebar()
page.run()

"""EditScope — the Streamlit dashboard.

``streamlit run app.py``. This script holds the navigation and the sidebar (model, method, this
session's edit stack); the pages in pages/ show and run edits through ``eval/`` and ``editing/``.
"""

import os

import streamlit as st

from ui.sidebar import render_sidebar
from ui.state import get_state
from ui.widgets import show_notices

st.set_page_config(page_title="EditScope", page_icon=":material/edit_note:", layout="wide")

PAGES = [
    st.Page("pages/playground.py", title="Playground", icon=":material/edit:", default=True),
    st.Page("pages/scope_map.py", title="Scope map", icon=":material/scatter_plot:"),
    st.Page("pages/compare.py", title="Compare methods", icon=":material/compare_arrows:"),
    st.Page("pages/batch.py", title="Batch & sequential", icon=":material/stacked_line_chart:"),
    st.Page("pages/locate.py", title="Locate", icon=":material/grid_on:"),
]

if os.environ.get("EDITSCOPE_DIAGNOSTICS", "").strip().lower() in ("1", "true", "yes"):
    PAGES.append(st.Page("pages/shared_model.py", title="Shared model", icon=":material/health_and_safety:"))

navigation = st.navigation(PAGES)
state = get_state()
render_sidebar(state)
show_notices(state)
navigation.run()

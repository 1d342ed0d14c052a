"""EditScope — the Streamlit dashboard.

``streamlit run app.py``. This script holds the navigation and the sidebar (model, method, this
session's edit stack); the pages in pages/ show and run edits through ``eval/`` and ``editing/``.
"""

import os
import threading

# Idle OpenMP threads sleep instead of spinning: with a background run and an interactive edit
# sharing few cores, spinning threads made edits up to 7x slower. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st

from editing.core.concurrency import background_priority, configure_threads
from ui.sidebar import render_sidebar
from ui.state import get_state
from ui.widgets import show_notices

# One intra-op thread per concurrent job (an interactive edit beside one background run).
configure_threads(concurrent_jobs=2)


@st.cache_resource(show_spinner=False)
def _warm_up_in_background() -> threading.Thread:
    """Once per server: compile UMAP's numba kernels in a background thread, so the first visit of
    the Scope map does not pay for it (it took minutes on a busy machine)."""
    from eval.scope import warm_up_umap

    def warm() -> None:
        with background_priority():
            warm_up_umap()

    thread = threading.Thread(target=warm, name="editscope-warm-up", daemon=True)
    thread.start()
    return thread


_warm_up_in_background()

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

"""Shared model health (shown when EDITSCOPE_DIAGNOSTICS is set): proves the shared model holds no session's
edit at rest, by a digest of its exact weights taken under the model's lock."""

from __future__ import annotations

import streamlit as st

from ui.models import edits_at_rest, weights_digest
from ui.state import get_state

state = get_state()
st.title("Shared model")
ctx = state.context
if ctx is None or ctx.handle is None:
    st.info(ctx.model_error if ctx and ctx.model_error else "No model is loaded.")
else:
    handle = ctx.handle
    st.caption("Every browser session shares this model; a session's edits are applied only while it computes, "
               "under the model's lock, and reverted bit for bit before the lock is released.")
    with st.spinner("Hashing the weights under the model's lock…"):
        digest, at_rest = weights_digest(handle), edits_at_rest(handle)
    cols = st.columns(2)
    cols[0].metric("Edits held at rest", at_rest, help="Edits applied to the shared weights outside any computation.",
                   border=True)
    cols[1].metric("Your session's edits", len(state.current_session().edits), border=True)
    with st.container(key="weights_digest"):
        st.code(digest, language="text")
    st.caption(f"SHA-256 of every parameter of {handle.name} ({handle.device.type}, "
               f"{str(handle.dtype).removeprefix('torch.')}).")

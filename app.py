"""EditScope — placeholder entry point; the full dashboard is built in pages/ (see DESIGN.md)."""

import streamlit as st

st.set_page_config(page_title="EditScope", layout="wide")
st.title("EditScope")
st.write("Knowledge editing playground. The dashboard pages are being built.")

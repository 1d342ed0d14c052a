"""Shared code of the Streamlit dashboard (app.py, pages/): state, sidebar, widgets, plots, model cache.

This package may import streamlit; the model math lives in ``editing/`` and ``eval/``.
"""

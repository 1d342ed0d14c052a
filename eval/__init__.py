"""EditScope's evaluation core: probes, metrics, data set readers, experiment runs, the run store
and the scope map. Usable from Python and the command line (``python -m eval``); never imports
streamlit.

Import the submodules (``eval.probes``, ``eval.metrics``, ``eval.datasets``, ``eval.evaluate``,
``eval.runs``, ``eval.store``, ``eval.scope``); this package module stays light so ``python -m
eval list`` does not load torch models.
"""

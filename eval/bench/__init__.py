"""The benchmark: what editing and evaluating cost, per method and model.

``python -m eval.bench [--quick] [--methods ROME,MEMIT] [--models demo,tiny] [--out DIR]
[--train] [--device cpu|cuda] [--markdown PATH] [--sequential-long N]``

For every registered method (methods that are not ready, e.g. untrained editors, are skipped
with the reason, or trained first with ``--train``) on the demo model and on a tiny random model
of each supported architecture it measures:

* **edit latency** — the median over several single edits (after one warm-up edit, which pays
  for caches such as ROME's second-moment statistics; reported separately as "cold"), and the
  peak memory of an edit (CUDA allocator peak on a GPU, process RSS growth on the CPU, see
  :mod:`editing.core.measure`);
* **evaluation throughput** — probes answered per second with the edit active (routed through
  the session, so inference wrappers pay for their longer prompts);
* **batch scaling** — one edit of 1, 10, 100 and 1000 requests for the batch editors (MEMIT,
  AlphaEdit), 1 and 10 for the others;
* **sequential scaling** — the cost of the k-th of n edits applied one after another;
* **a long sequential run** (``--sequential-long N``, off unless asked for: 1,000 ROME edits take
  about half an hour on a 2-core CPU) — N ROME edits into one session, each step editing and then
  entering the session again to judge the new edit, as ``eval.runs`` does: the time of a step
  around step 10 against the last steps (the ratio shows whether a step's cost grows with the
  number of edits), the part of it outside ROME's own computation, the process's peak memory, and
  re-applying the final stack through the session's cache against applying it edit by edit;
* the **performance targets** of the issue, each with its measured value and its ratio to the
  target: a ROME edit with cached statistics under 1 s, 100 probes evaluated before and after
  under 1 s, the scope map of 100 points under 3 s after warm-up, MEMIT with 1000 edits in one
  batch within 24 GiB.

Results go to ``DIR`` (default ``out/bench``): one CSV per table, ``machine.json``, a plot
(PNG through plotly's static export when kaleido is installed, else matplotlib when installed,
else a self-contained HTML file) and ``benchmark.md``, the Markdown tables the README shows.

The dashboard's own figures (time to the first result in a browser, the Scope map's first render)
are the UI's benchmark, ``python -m ui.bench``: this layer never starts Streamlit or a browser.

Modules: :mod:`~eval.bench.common` (machine, timing), :mod:`~eval.bench.rows` (result rows,
targets), :mod:`~eval.bench.cases` (the measurements), :mod:`~eval.bench.report` (CSV, Markdown,
plot), :mod:`~eval.bench.run` (configuration, the run, the command line).
"""

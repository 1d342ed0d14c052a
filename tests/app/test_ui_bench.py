"""The dashboard's benchmark (python -m ui.bench): its figures come from a real browser run."""

from __future__ import annotations

import pytest
import torch

from eval.bench.common import machine_info
from ui import bench
from ui.browser import server_unavailable_reason

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_time_to_first_result_and_first_scope_map_in_a_real_browser(tmp_path):
    """Every phase measured, in order, and written as the Markdown section the docs keep."""
    reason = server_unavailable_reason()
    if reason:
        pytest.skip(reason)  # no Chromium on this machine: `make browser` installs it
    server = bench.bench_time_to_first_result(timeout_s=600.0)
    assert server["status"] == "ok", server
    assert 0 < server["server_up_s"] <= server["page_ready_s"] <= server["first_result_s"]
    assert 0 < server["scope_map_s"] and server["first_result_s"] < server["scope_map_after_start_s"]
    markdown = bench.server_markdown(server, machine_info(torch.device("cpu")))
    assert "Scope map's first render" in markdown and f"{server['first_result_s']:.1f} s" in markdown


def test_an_unmeasured_run_says_why():
    markdown = bench.server_markdown({"status": "skipped", "reason": "no Chromium"}, machine_info(torch.device("cpu")))
    assert "Not measured (skipped: no Chromium)" in markdown

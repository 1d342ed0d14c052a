"""The non-ROME editing methods on a real pretrained model (SmolLM2-135M, LLaMA architecture).

Each of FT, FT-L, FT-M, KN, GRACE, IKE, T-Patcher and CaliNET edits "The Eiffel Tower is located
in the city of" → Rome once through an :class:`EditSession`; the edit must raise P(Rome), and
leaving ``session.active()`` and undoing must give back the model bit for bit. Methods with a
training loop run a few steps here (hparams overrides) to keep the module short; the fast
methods whose defaults are cheap (FT, FT-L, FT-M, GRACE) run with their SmolLM2 defaults and
must also make Rome the greedy answer while "The Louvre is located in the city of" keeps Paris.

Skipped only when SmolLM2 is not installed (``editing.models.pretrained.available_pretrained()``).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from editing.analysis.scoring import score_routes, top_predictions_routed
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.models import pretrained
from editing.models.loader import load_model
from tests.helpers import assert_params_equal, params_snapshot

NAME = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"
NEIGHBOUR = "The Louvre is located in the city of"

pytestmark = [pytest.mark.slow, pytest.mark.realmodel]


@pytest.fixture(scope="module")
def smol():
    if NAME not in pretrained.available_pretrained():
        pytest.skip(f"{NAME} is not installed ({pretrained.spec_of(NAME).install_command})")
    torch.manual_seed(0)
    return load_model(NAME)


def _p_rome_and_top(session: EditSession) -> tuple[float, str, str]:
    """P(" Rome" | edit prompt), and the top next token of the edit prompt and of the neighbour,
    as the session answers them (inference wrappers route the prompt)."""
    routes = session.routes([PROMPT, NEIGHBOUR])
    p_rome = score_routes(routes[:1], [" Rome"])[0].prob
    tops = top_predictions_routed(routes, k=1)
    return p_rome, tops[0][0].token.strip(), tops[1][0].token.strip()


def _logits(handle) -> torch.Tensor:
    ids = torch.tensor([handle.tokenizer(PROMPT)["input_ids"]], device=handle.device)
    with torch.no_grad():
        return handle.model(ids).logits


# (method, hparams overrides for a short test run or None for the SmolLM2 defaults, defaults must
# also make Rome the greedy answer and keep the neighbour's Paris)
CASES: list[tuple[str, dict[str, Any] | None, bool]] = [
    ("FT", None, True),
    ("FT-L", None, True),
    ("FT-M", None, True),
    ("GRACE", None, True),
    ("KN", {"layers": (24, 25, 26, 27, 28, 29), "steps": 5}, False),
    ("IKE", None, False),  # raises P(Rome) only slightly: a 135M model barely follows in-context edits
    ("T-Patcher", {"max_steps": 15, "memory_facts": 40}, False),
    ("CaliNET", {"max_steps": 15, "locality_facts": 40}, False),
]


@pytest.mark.parametrize(("method", "overrides", "full"), CASES, ids=[c[0] for c in CASES])
def test_method_edits_smollm2_and_reverts_bit_for_bit(smol, method, overrides, full):
    before = params_snapshot(smol)
    out_before = _logits(smol)
    session = EditSession(smol)
    with session.active():
        p_before, top_before, neighbour_before = _p_rome_and_top(session)
    assert top_before == "Paris" and neighbour_before == "Paris"  # the model knows both facts

    edit = session.apply(method, EditRequest(PROMPT, "Eiffel Tower", "Rome"), overrides)
    assert edit.method == method
    with session.active():
        p_after, top_after, neighbour_after = _p_rome_and_top(session)
    assert p_after > p_before, f"{method} did not raise P(Rome): {p_before:.4f} -> {p_after:.4f}"
    if full:
        assert top_after == "Rome", f"{method}'s default edit answers {top_after!r}"
        assert neighbour_after == "Paris", f"{method}'s default edit moved the Louvre to {neighbour_after!r}"

    # outside active() the shared model holds no edit; undone, the session applies nothing
    assert_params_equal(smol, before)
    assert torch.equal(_logits(smol), out_before)
    session.undo()
    with session.active():
        assert torch.equal(_logits(smol), out_before)
        p_undone, _, _ = _p_rome_and_top(session)
    assert p_undone == p_before
    assert_params_equal(smol, before)

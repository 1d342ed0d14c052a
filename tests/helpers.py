"""Helpers for tests (importable as ``tests.helpers``)."""

from __future__ import annotations

import random

import torch

from editing.analysis.scoring import score_targets
from editing.core.request import EditRequest
from editing.storage.factbase import is_memory_subject, load_factbase


def params_snapshot(handle) -> dict[str, torch.Tensor]:
    """A copy of every parameter of the handle's model."""
    return {n: p.detach().clone() for n, p in handle.model.named_parameters()}


def assert_params_equal(handle, snapshot: dict[str, torch.Tensor]) -> None:
    """Every parameter equals the snapshot bit for bit."""
    for name, param in handle.model.named_parameters():
        assert torch.equal(param, snapshot[name]), f"parameter {name} differs"


def random_delta(handle, layer: int = 1, rank: int | None = None, scale: float = 0.1, seed: int = 0,
                 request=None):
    """A seeded random :class:`WeightDelta` on one layer's MLP output weight: dense, or low rank
    with ``rank`` (for tests of edits, sessions and files that need no real method)."""
    from editing.core.edit import ParamDelta, WeightDelta
    from editing.core.request import EditRequest

    request = request or EditRequest("The capital of {} is", "France", "Lyon", "Paris")
    name = handle.arch.mlp_out_name(layer) + ".weight"
    shape = handle.parameter(name).shape
    gen = torch.Generator().manual_seed(seed)
    if rank is None:
        delta = ParamDelta(dense=scale * torch.randn(shape, generator=gen))
    else:
        delta = ParamDelta.low_rank(scale * torch.randn(shape[0], rank, generator=gen),
                                    torch.randn(rank, shape[1], generator=gen))
    return WeightDelta(method="test", requests=[request], hparams={}, deltas={name: delta})


# -- shared by the module-patch method tests (T-Patcher, CaliNET, GRACE) ------------------------
def logits(handle, text: str = "The capital of France is") -> torch.Tensor:
    ids = torch.tensor([handle.tokenizer(text)["input_ids"]], device=handle.device)
    with torch.no_grad():
        return handle.model(ids).logits


def assert_patch_changes_reverts_and_reloads(handle, edit, before: dict[str, torch.Tensor],
                                             out_before: torch.Tensor, folder):
    """An applied module patch changes the output; reverted, output and parameters are back bit for
    bit; saved to ``folder`` and loaded, it gives the same edited output again. Returns the loaded edit."""
    from editing.core.edit import load_edit

    out_edited = logits(handle)
    assert not torch.equal(out_edited, out_before)
    edit.revert(handle)
    assert torch.equal(logits(handle), out_before)
    assert_params_equal(handle, before)
    loaded = load_edit(edit.save(folder))
    loaded.apply(handle)
    assert torch.equal(logits(handle), out_edited)
    loaded.revert(handle)
    return loaded


def hit_rate(handle, pairs) -> float:
    """Fraction of (prompt, answer) pairs whose answer tokens are all the argmax (teacher-forced)."""
    scores = score_targets(handle, [p for p, _ in pairs], [a for _, a in pairs])
    return sum(s.accuracy == 1.0 for s in scores) / len(scores)


def neighbours(records, per_record: int = 4, seed: int = 7, exclude=()) -> list[tuple[str, str]]:
    """CounterFact-style neighbourhood: the edit's own prompt about other subjects of its relation
    (their true answers; first those sharing the edited subject's true answer, the hardest to keep
    apart), plus the same facts asked with a held-out template. Like :mod:`eval.probes`, only
    probe-side subjects: the others are the training memory of CaliNET, T-Patcher and IKE."""
    factbase, rng = load_factbase(), random.Random(seed)
    edited = {r.request.subject for r in records} | set(exclude)
    pairs = []
    for record in records:
        relation = next(rel for rel in factbase.relations.values()
                        if record.request.prompt in rel.train_templates + rel.heldout_templates)
        others = [f for f in factbase.facts_of(relation.id)
                  if f.subject not in edited and f.object != record.request.target_new
                  and not is_memory_subject(f.subject)]
        sharing = [f for f in others if f.object == record.request.target_true]
        chosen = rng.sample(sharing, min(per_record, len(sharing)))
        chosen += rng.sample([f for f in others if f not in chosen], per_record - len(chosen))
        for fact in chosen:
            pairs.append((record.request.prompt.replace("{}", fact.subject), fact.object))
            pairs.append((rng.choice(relation.heldout_templates).replace("{}", fact.subject), fact.object))
    return pairs


def predictions(handle, pairs) -> list[list[int]]:
    return [s.predicted.tolist() for s in score_targets(handle, [p for p, _ in pairs], [a for _, a in pairs])]


def agreement(after: list[list[int]], before: list[list[int]]) -> float:
    """Locality as the survey defines it: post-edit predictions equal to pre-edit ones."""
    return sum(a == b for a, b in zip(after, before, strict=True)) / len(before)


def heldout_edits_and_neighbours(handle, count: int, seed: int, near_from: int):
    """The first ``count`` held-out edit records of ``seed``, 3 neighbours each of the first
    ``near_from`` of them (no subject of the records), and the model's predictions on those
    neighbours now: the baseline of :func:`edit_figures`' locality."""
    from editing.train import edit_records

    records = edit_records("heldout", seed=seed)[:count]
    near = neighbours(records[:near_from], per_record=3, exclude=[r.request.subject for r in records])
    return records, near, predictions(handle, near)


def edit_figures(handle, records, near, base: list[list[int]]) -> tuple[float, float, float]:
    """With the records' edits in place: the fraction of their prompts and of their paraphrases that
    answer the new target, and the agreement of the neighbours' predictions with ``base``."""
    reliability = hit_rate(handle, [(r.request.text, r.request.target_new) for r in records])
    generality = hit_rate(handle, [(p, r.request.target_new) for r in records for p in r.paraphrases])
    return reliability, generality, agreement(predictions(handle, near), base)


def single_edit_figures(handle, method: str, records, check=None) -> tuple[float, float, float]:
    """Apply ``method`` to each record alone (reverted after): the fractions of edits whose prompt
    and whose paraphrases answer the new target, and the mean agreement on the records'
    neighbours. ``check(edit)`` runs on every applied edit."""
    from editing.methods import get_method

    editor = get_method(method)
    near = neighbours(records)
    base = predictions(handle, near)
    reliable, general, kept = [], [], []
    for record in records:
        edit = editor.apply(handle, [record.request])
        try:
            reliable.append(hit_rate(handle, [(record.request.text, record.request.target_new)]))
            general.append(hit_rate(handle, [(p, record.request.target_new) for p in record.paraphrases]))
            kept.append(agreement(predictions(handle, near), base))
            if check is not None:
                check(edit)
        finally:
            edit.revert(handle)
    n = len(records)
    figures = sum(reliable) / n, sum(general) / n, sum(kept) / n
    print(f"{method} single edits: reliability {figures[0]:.2f}, generality {figures[1]:.2f}, "
          f"locality {figures[2]:.3f}")
    return figures


# -- shared by the learned weight-delta editors' tests (MEND, KE) ---------------------------------
#: the reduced training run of the learned editors' behaviour tests (the default runs 600 steps)
EDITOR_TEST_CONFIG = {"steps": 60, "n_eval": 0, "checkpoint_every": 30}

#: the learned editors' test edits, in words of the demo vocabulary (anything else reads as <unk>)
EDITOR_REQUESTS = [EditRequest("The capital of {} is", "France", "Rome", "Paris"),
                   EditRequest("{} is a famous landmark in", "Eiffel Tower", "Germany", "France")]


def train_test_editor(handle, method_name: str) -> str:
    """The folder of ``method_name``'s editor trained with :data:`EDITOR_TEST_CONFIG` (cached on
    disk by config, so each test module trains it once)."""
    from editing.train import train_editor

    folder, _report = train_editor(handle, method_name, EDITOR_TEST_CONFIG)
    return str(folder)


def assert_editor_raises_heldout_reliability(handle, method_name: str, checkpoint: str) -> None:
    """The editor in ``checkpoint`` makes held-out counterfactual edits take, on their paraphrases
    too, and leaves other facts alone (the figures are printed for the log)."""
    from editing.learning.learned import evaluate_editor
    from editing.methods import get_method
    from editing.train import edit_records

    records = edit_records("heldout")[:60]
    result = evaluate_editor(handle, get_method(method_name), records, {"checkpoint": checkpoint})
    print(f"{method_name} held-out (reduced training):", result)
    assert result["pre_reliability"] <= 0.1 and result["pre_generality"] <= 0.1  # counterfactual targets
    assert result["reliability"] >= 0.8
    assert result["generality"] >= 0.6
    assert result["locality"] >= 0.85


def assert_editor_built_on_requested_device_in_float32(method_name: str, build_editor) -> torch.nn.Module:
    """``build_editor`` places the editor of the method's default config on the model's device (a
    bfloat16 tiny llama) or the one asked for, in float32, and initialises it the same on every
    device; returns the editor built on the model's device."""
    from editing.models.tiny import tiny_model
    from editing.train import TRAINERS

    handle = tiny_model("llama")
    handle.model.to(torch.bfloat16)
    config = TRAINERS[method_name].default_config(handle)
    editor = build_editor(handle, config)  # the model's device by default
    assert {(p.device, p.dtype) for p in editor.parameters()} == {(handle.device, torch.float32)}
    elsewhere = build_editor(handle, config, device="meta")  # stands in for a GPU here
    assert all(t.is_meta for t in [*elsewhere.parameters(), *elsewhere.buffers()])
    assert {p.dtype for p in elsewhere.parameters()} == {torch.float32}
    # seeded on the CPU before it is moved: the same initial editor on every device
    again = build_editor(handle, config)
    pairs = zip(editor.state_dict().values(), again.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    return editor


def batch_reliability_summing_singles(handle, method: str, hparams: dict) -> float:
    """Edit five batches of four held-out counterfacts (different subjects and relations, records
    50 apart) and return the fraction of target tokens hit. On the first batch, check that the
    batch's update is the sum of the four single edits' updates (rank and values), as both
    methods sum independent per-request updates."""
    from editing.methods import get_method
    from editing.train import edit_records

    heldout = edit_records("heldout")
    batches = [[heldout[first + 50 * j].request for j in range(4)] for first in range(5)]
    editor = get_method(method)
    hits = []
    for requests in batches:
        edit = editor.apply(handle, requests, hparams)
        try:
            scores = score_targets(handle, [r.text for r in requests], [r.target_new for r in requests])
        finally:
            edit.revert(handle)
        hits += [s.accuracy for s in scores]
        if requests is batches[0]:
            singles = []
            for request in requests:
                single = editor.apply(handle, [request], hparams)
                single.revert(handle)
                singles.append(single)
            for name, delta in edit.deltas.items():
                assert delta.rank == sum(s.deltas[name].rank for s in singles)
                expected = sum(s.deltas[name].materialise() for s in singles)
                assert torch.allclose(delta.materialise(), expected, atol=1e-5)
    return sum(hits) / len(hits)


def assert_saved_deltas_round_trip(edit, folder) -> None:
    """A weight-delta edit saved to ``folder`` loads with every delta equal bit for bit."""
    from editing.core.edit import load_edit

    saved = load_edit(edit.save(folder))
    for name, delta in edit.deltas.items():
        assert torch.equal(saved.deltas[name].materialise(), delta.materialise())


def held_run_store(path):
    """A run store that, after a run's first step, signals ``first_step`` and holds the run until
    ``release`` is set: makes "while the run goes on" a deterministic moment.

    Returns ``(make_store, first_step, release)``; ``make_store()`` opens a store at ``path``.
    """
    import threading

    from eval.store import RunStore

    first_step, release = threading.Event(), threading.Event()

    class HeldStore(RunStore):
        def add_step(self, run_id, summary_row, probe_rows):
            super().add_step(run_id, summary_row, probe_rows)
            first_step.set()
            release.wait(120)

    return (lambda: HeldStore(path)), first_step, release


def assert_learned_editor_edits_bfloat16(method_name: str, build_editor, family: str, requests) -> None:
    """Train ``method_name``'s editor (quick settings) on a bfloat16 tiny model and apply it: the
    editor runs in float32 on the model's device, each update is added to a float32 copy of the
    weight and rounded once, and the revert is bit for bit. Set ``EDITSCOPE_EDITORS`` first."""
    from editing.methods import get_method
    from editing.models.tiny import tiny_model
    from editing.train import TRAINERS, train_editor

    handle = tiny_model(family)
    handle.model.to(torch.bfloat16)
    folder, report = train_editor(handle, method_name, TRAINERS[method_name].quick)
    assert report["history"] and all(v == v for entry in report["history"] for v in entry.values())  # no NaN
    method, hparams = get_method(method_name), {"checkpoint": str(folder)}
    editor, _ = method.trained_editor(handle, hparams, lambda config: build_editor(handle, config))
    assert {(p.device, p.dtype) for p in editor.parameters()} == {(handle.device, torch.float32)}
    before = params_snapshot(handle)
    edit = method.apply(handle, requests, hparams)
    try:
        changed = False
        for name, delta in edit.deltas.items():
            param = handle.parameter(name)
            # the float32 update added to a float32 copy of the weight, rounded once
            assert torch.equal(param, (before[name].float() + delta.materialise("cpu")).to(torch.bfloat16))
            changed = changed or not torch.equal(param, before[name])
        assert changed
    finally:
        edit.revert(handle)
    assert_params_equal(handle, before)

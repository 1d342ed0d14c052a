"""A model sharded over several GPUs (``device_map``), simulated on the CPU (tests/virtual_devices.py).

Each layer's weights report their own ``cuda:i`` device and every operation is checked as CUDA
checks it, so an index built on the model's first device and applied to a later layer's
activations raises here as it would on real hardware. The arithmetic still runs on the CPU, so a
sharded model must give exactly what the same model on one device gives: every test compares the
two bit for bit (the causal traces to float32 rounding, see the last tests).
"""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from editing.analysis.stats import collect_second_moments
from editing.analysis.trace import trace_all
from editing.core.request import EditRequest
from editing.core.session import EditSession
from editing.methods import get_method
from editing.models.loader import load_model
from editing.models.tiny import tiny_model
from eval.evaluate import evaluate_edit, outcome_table, predict
from eval.probes import probes_for_request
from eval.scope import scope_map
from tests.helpers import assert_params_equal, params_snapshot
from tests.virtual_devices import DeviceMismatch, VirtualDevices, cuda_runtime, shard

CAPITAL = EditRequest("The capital of {} is", "France", "Rome", "Paris")
EIFFEL = EditRequest("{} is a famous landmark in", "Eiffel Tower", "Italy", "France")
GPUS = [torch.device("cuda", i) for i in range(4)]
#: every method that needs no trained editor; MEND, KE and SERAC are trained below
UNTRAINED = ["ROME", "MEMIT", "AlphaEdit", "FT", "FT-L", "FT-M", "KN", "GRACE", "T-Patcher", "CaliNET", "IKE"]


def sharded_tiny_llama(n_devices: int = 4, dtype: torch.dtype = torch.float32):
    """A tiny LLaMA with its four blocks on ``n_devices`` simulated GPUs, and the simulation."""
    handle = tiny_model("llama")
    handle.model.to(dtype)
    gpus = VirtualDevices()
    shard(handle, gpus, n_devices)
    return handle, gpus


def predictions(handle, requests, method: str, hparams: dict | None = None):
    """Probe predictions before and after ``method``'s edit, as a table (NaN-aware comparison)."""
    probes = probes_for_request(EIFFEL).probes[:8]
    session = EditSession(handle)
    before = predict(session, probes)
    session.apply(method, requests, hparams)
    return outcome_table(before, predict(session, probes))


def test_the_simulation_refuses_what_cuda_refuses():
    """The checks the tests below rely on: one device per operation, CPU scalars and CPU indices
    allowed, moves change the reported device, factories honour ``device=``."""
    gpus = VirtualDevices()
    first, second = torch.ones(4, 3), torch.ones(4, 3)
    gpus.place(first, "cuda:0")
    gpus.place(second, 1)
    with gpus:
        assert (first.device, second.device) == (GPUS[0], GPUS[1])
        with pytest.raises(DeviceMismatch, match="cuda:0 and cuda:1"):
            _ = first + second
        with pytest.raises(DeviceMismatch):  # the bug this file guards against
            _ = second[torch.arange(2, device=first.device)]
        with pytest.raises(DeviceMismatch):
            _ = first + torch.ones(4, 3)  # a CPU tensor that is not a scalar
        assert (first + second.to(first.device)).device == GPUS[0]
        assert second.device == GPUS[1]  # moving made a copy
        assert (second * torch.tensor(2.0)).device == GPUS[1]  # a CPU scalar
        assert second[torch.tensor([0, 2])].device == GPUS[1]  # a CPU index
        assert torch.zeros(2, device="cuda:3").device == GPUS[3]
        assert second.cpu().device == torch.device("cpu")
        with pytest.raises(TypeError):
            second.numpy()
    assert gpus.checked_ops > 0


def test_a_sharded_model_runs_with_each_block_on_its_gpu():
    handle, gpus = sharded_tiny_llama()
    plain = tiny_model("llama")
    ids = torch.tensor([[5, 6, 7, 8]])
    with gpus:
        assert handle.devices == GPUS and handle.device == GPUS[0]
        assert [handle.module_device(handle.arch.block_name(i)) for i in range(4)] == GPUS
        assert handle.module_device(handle.arch.lm_head) == GPUS[3]
        logits = handle.model(input_ids=ids.to(handle.device)).logits
        assert logits.device == GPUS[0]  # outputs come back where the inputs were
    assert torch.equal(logits, plain.model(input_ids=ids).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("method", UNTRAINED)
def test_each_method_edits_a_sharded_model_as_it_edits_one_on_a_single_device(method, dtype):
    """bfloat16 as a GPU loads by default: updates meet activations in the model's dtype on each
    layer's device, float32 masters live with their weights."""
    plain = tiny_model("llama")
    plain.model.to(dtype)
    expected = predictions(plain, [CAPITAL], method)
    handle, gpus = sharded_tiny_llama(dtype=dtype)
    before = params_snapshot(handle)
    with cuda_runtime() as cuda, gpus:
        got = predictions(handle, [CAPITAL], method)
    assert got.equals(expected)
    assert_params_equal(handle, before)  # nothing stays applied at rest
    # the edit's peak memory is read on every GPU holding the model
    assert {torch.device(args[0]) for args in cuda["max_memory_allocated"]} == set(GPUS)


@pytest.mark.parametrize("method, hparams", [
    ("KN", {"layers": [0, 1, 2, 3]}),  # attributions gathered from four GPUs
    ("CaliNET", {"layers": [1, 3], "max_steps": 8}),  # slots on two GPUs, full forward passes
    ("MEMIT", {"layers": [0, 1, 2]}),  # keys and residuals on three GPUs, z on the third
    ("FT-L", {"layers": [0, 3]}),  # two GPUs fine-tuned at once
])
def test_methods_spanning_several_gpus(method, hparams):
    expected = predictions(tiny_model("llama"), [CAPITAL], method, hparams)
    handle, gpus = sharded_tiny_llama()
    with cuda_runtime(), gpus:
        got = predictions(handle, [CAPITAL], method, hparams)
    assert got.equals(expected)


@pytest.mark.parametrize("method", ["MEND", "KE", "SERAC"])
def test_learned_editors_train_and_edit_on_a_sharded_model(method, tmp_path, monkeypatch):
    """Training runs on the sharded model (editors on its first GPU, the gradient factors and
    weight shifts moved between it and each layer's) and reports what it reports on one device,
    held-out figures included; the editor then edits the sharded model exactly as the same model
    on one device."""
    from editing.train import TRAINERS, train_editor

    def without_timings(report: dict) -> dict:
        return {key: without_timings(value) if isinstance(value, dict) else value for key, value in report.items()
                if "second" not in key and "time" not in key}

    get_method(method)  # importing the method registers its trainer
    config = {**TRAINERS[method].quick, "n_eval": 6}
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path / "one-device"))
    _, expected = train_editor(tiny_model("llama"), method, config)
    monkeypatch.setenv("EDITSCOPE_EDITORS", str(tmp_path / "sharded"))
    handle, gpus = sharded_tiny_llama()
    with cuda_runtime(), gpus:
        folder, report = train_editor(handle, method, config)
        got = predictions(handle, [CAPITAL], method, {"checkpoint": str(folder)})
    assert report.get("history") or report.get("n_train_records")  # it trained (SERAC keeps no history)
    assert without_timings(report) == without_timings(expected)
    assert got.equals(predictions(tiny_model("llama"), [CAPITAL], method, {"checkpoint": str(folder)}))


def test_sequential_bfloat16_edits_on_a_sharded_model_revert_bit_for_bit():
    """Half-precision weights on several GPUs: each edited weight's float32 master lives with it,
    the stack cache re-enters with every edit, and leaving restores every bit."""
    handle, gpus = sharded_tiny_llama(dtype=torch.bfloat16)
    plain = tiny_model("llama")
    plain.model.to(torch.bfloat16)
    requests = [CAPITAL, EditRequest("The capital of {} is", "Spain", "Berlin", "Madrid")]
    before = params_snapshot(handle)
    with cuda_runtime(), gpus:
        session = EditSession(handle)
        with session.stack_cache():
            for request in requests:
                session.apply("MEMIT", [request], {"layers": [1, 2]})
            with session.active():
                edited = {n: p.detach().clone() for n, p in handle.model.named_parameters()}
    reference = EditSession(plain)
    for request in requests:
        reference.apply("MEMIT", [request], {"layers": [1, 2]})
    with reference.active():
        for name, param in plain.model.named_parameters():
            assert torch.equal(edited[name], param), name
    assert any(not torch.equal(edited[n], before[n]) for n in before)
    assert_params_equal(handle, before)


@pytest.mark.parametrize("free_bytes", [80 * 2**30, 0], ids=["sums-on-each-layers-gpu", "sums-on-the-host"])
def test_statistics_of_a_sharded_model_are_those_of_one_device(free_bytes):
    texts = ["The capital of France is Paris.", "Rome is in Italy.", "A small corpus of a few lines."]
    expected, n_expected = collect_second_moments(tiny_model("llama"), [0, 3], texts)
    handle, gpus = sharded_tiny_llama()
    with cuda_runtime(free_bytes=free_bytes), gpus:
        moments, n_tokens = collect_second_moments(handle, [0, 3], texts)
        places = {layer: moment.device for layer, moment in moments.items()}
    assert places == ({0: GPUS[0], 3: GPUS[3]} if free_bytes else dict.fromkeys((0, 3), torch.device("cpu")))
    assert n_tokens == n_expected
    assert all(torch.equal(moments[layer], expected[layer]) for layer in (0, 3))


def test_evaluation_scope_map_and_causal_trace_on_a_sharded_demo_model():
    """The Playground's whole path on the demo model (GPT-2 layout, tied unembedding on the first
    GPU) spread over three GPUs: the edit, its probe table and metrics, the scope map and the three
    causal traces equal those of the unsharded model."""
    plain, handle = load_model("demo"), load_model("demo")
    gpus = VirtualDevices()
    shard(handle, gpus, n_devices=3)
    probes = probes_for_request(EIFFEL)
    prompt = "The Eiffel Tower is a famous landmark in"
    results = []
    for model, simulation in ((plain, None), (handle, gpus)):
        with cuda_runtime(), (simulation or nullcontext()):
            session = EditSession(model)
            outcome = evaluate_edit(session, "ROME", [EIFFEL], probes, generation_kinds=("rewrite",))
            scope = scope_map(session, probes)
            traces = trace_all(model, prompt, "Eiffel Tower")
        results.append((outcome, scope, traces))
    (outcome, scope, traces), (sharded_outcome, sharded_scope, sharded_traces) = results
    assert sharded_outcome.metrics == outcome.metrics and sharded_outcome.table.equals(outcome.table)
    assert sharded_scope.points.equals(scope.points)
    assert np.array_equal(sharded_scope.hidden_after, scope.hidden_after)
    # The trace reads one position of the final norm's output (a strided view) into the unembedding
    # on another GPU: the move makes it contiguous, so the product may round differently (a real
    # GPU copy does the same). Equal up to float32 rounding, not bit for bit.
    for kind, trace in traces.items():
        torch.testing.assert_close(sharded_traces[kind].scores, trace.scores, rtol=1e-5, atol=1e-6, msg=kind)
    assert get_method("ROME").name == sharded_outcome.edit.method


def test_runs_and_the_models_own_sentence_encoder_on_a_sharded_demo_model():
    """A sequential run (stack cache) and a batch run with generations, and the fallback sentence
    encoder (mean hidden state of a middle block, on another GPU), as on one device."""
    from editing.analysis.embeddings import sentence_encoder
    from eval.datasets import load_dataset
    from eval.runs import run_experiment

    plain, handle = load_model("demo"), load_model("demo")
    gpus = VirtualDevices()
    shard(handle, gpus, n_devices=3)
    cases = load_dataset("demo", limit=4)
    texts = ["The Eiffel Tower is in Paris.", "Rome"]
    results = []
    for model, simulation in ((plain, None), (handle, gpus)):
        with cuda_runtime(), (simulation or nullcontext()):
            runs = [run_experiment(model, "MEMIT", cases, mode=mode, batch_size=2, generations=True).summary
                    for mode in ("sequential", "batch")]
            vectors = sentence_encoder(model, "model").encode(texts)
        results.append((runs, vectors))
    (runs, vectors), (sharded_runs, sharded_vectors) = results
    for run, sharded_run in zip(runs, sharded_runs, strict=True):
        judged = [c for c in run.columns if "time" not in c and "memory" not in c]  # costs differ
        assert sharded_run[judged].equals(run[judged])
    assert torch.equal(sharded_vectors, vectors)

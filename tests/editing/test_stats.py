"""Second-moment statistics: the right quantity, one pass, early stop, cache keys."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from editing.analysis import stats
from editing.core.hooks import capture
from editing.models.tiny import tiny_model

TEXTS = [
    "Paris is the capital of France .",
    "The official language of Germany is German",
    "Berlin",
    "Rome , the capital of Italy , was the centre of the ancient Roman Empire .",
]


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Statistics cached under a temporary folder, nothing held in memory."""
    monkeypatch.setenv("EDITSCOPE_CACHE", str(tmp_path / "cache"))
    stats.clear_memory_cache()
    yield tmp_path / "cache"
    stats.clear_memory_cache()


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(TEXTS) + "\n\n")
    return path


def brute_force_moment(handle, layer: int, texts: list[str]) -> torch.Tensor:
    """Σ k kᵀ / n over every token, one unpadded text at a time."""
    name = handle.arch.mlp_out_name(layer)
    total, count = 0, 0
    for text in texts:
        ids = torch.tensor([handle.tokenizer(text)["input_ids"]])
        with torch.no_grad(), capture(handle.model, [name], inputs=True) as got:
            handle.model(ids)
        keys = got[name][0].double()
        total = total + keys.T @ keys
        count += keys.shape[0]
    return (total / count).float()


def test_moment_is_uncentred_second_moment_over_non_pad_tokens(isolated_cache, corpus_file):
    handle = tiny_model("gpt2")
    got = stats.second_moments(handle, [1, 2], corpus=corpus_file, n_samples=100, batch_size=3)
    for layer in (1, 2):
        expected = brute_force_moment(handle, layer, TEXTS)
        assert got[layer].shape == (handle.d_ff, handle.d_ff)
        assert torch.allclose(got[layer], expected, rtol=1e-4, atol=1e-6)
    # one pass for two layers equals two separate passes
    single = stats.second_moments(handle, [2], corpus=corpus_file, n_samples=100, batch_size=1, use_cache=False)
    assert torch.allclose(single[2], got[2], rtol=1e-4, atol=1e-6)


def test_collection_stops_after_the_last_needed_layer(isolated_cache, corpus_file):
    handle = tiny_model("llama")
    calls = {"block": 0, "head": 0}
    hooks = [
        handle.arch.block(handle.model, 3).register_forward_hook(lambda *_: calls.__setitem__("block", 1)),
        handle.module(handle.arch.lm_head).register_forward_hook(lambda *_: calls.__setitem__("head", 1)),
    ]
    try:
        stats.second_moments(handle, [0, 1], corpus=corpus_file, n_samples=100)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"block": 0, "head": 0}


def test_cache_on_disk_keyed_by_model_layer_corpus_and_samples(isolated_cache, corpus_file, monkeypatch):
    handle = tiny_model("gpt_neox")
    reports = []
    first = stats.second_moments(handle, [0, 3], corpus=corpus_file, n_samples=3,
                                 progress=lambda f, m: reports.append(f))
    assert reports and reports[-1] == pytest.approx(1.0)
    files = sorted(p.name for p in isolated_cache.rglob("*.safetensors"))
    assert len(files) == 2 and all("_n3_" in f for f in files)

    stats.clear_memory_cache()

    def must_not_collect(*_args, **_kwargs):
        raise AssertionError("statistics were recomputed although cached")

    monkeypatch.setattr(stats, "collect_second_moments", must_not_collect)
    again = stats.second_moments(handle, [3, 0], corpus=corpus_file, n_samples=3)
    assert torch.equal(again[0], first[0]) and torch.equal(again[3], first[3])
    monkeypatch.undo()
    monkeypatch.setenv("EDITSCOPE_CACHE", str(isolated_cache))

    # another sample count, another corpus, another model: new files, different values
    stats.second_moments(handle, [0], corpus=corpus_file, n_samples=2)
    stats.second_moments(handle, [0], corpus="corpus", n_samples=5)
    other = stats.second_moments(tiny_model("gpt_neox", seed=1), [0], corpus=corpus_file, n_samples=3)
    assert not torch.allclose(other[0], first[0])
    assert len(list(isolated_cache.rglob("*.safetensors"))) == 5


def test_statistics_on_every_family(isolated_cache, corpus_file, tiny_handle):
    moment = stats.second_moment(tiny_handle, 1, corpus=corpus_file, n_samples=100)
    assert moment.shape == (tiny_handle.d_ff, tiny_handle.d_ff) and moment.dtype == torch.float32
    assert torch.isfinite(moment).all()
    assert torch.allclose(moment, moment.T, atol=1e-6)
    assert float(torch.linalg.eigvalsh(moment.double()).min()) > -1e-5  # positive semi-definite


def test_bundled_corpus_mixes_prose_and_fact_sentences():
    corpus = stats.resolve_corpus("bundled", n_samples=3000)
    assert len(corpus.texts) == 3000
    assert corpus == stats.resolve_corpus("bundled", n_samples=3000)  # deterministic
    assert "The capital of France is Paris" in stats.bundled_texts()
    lines = set(stats.load_corpus())
    assert any(t in lines for t in corpus.texts) and any(t not in lines for t in corpus.texts)
    assert stats.resolve_corpus("bundled", 10).id != stats.resolve_corpus("corpus", 10).id


def test_bad_corpus_and_layer_are_reported(isolated_cache, tmp_path):
    with pytest.raises(stats.StatsError, match="neither"):
        stats.resolve_corpus(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(stats.StatsError, match="no text"):
        stats.resolve_corpus(empty)
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(stats.StatsError, match="datasets"):
            stats.resolve_corpus("hf:wikitext:wikitext-2-raw-v1:train")
    with pytest.raises(ValueError, match=r"layers 0\.\.3"):
        stats.second_moments(tiny_model("gpt2"), [7], corpus="corpus", n_samples=2)


def test_running_sums_stay_on_the_device_only_where_they_fit(monkeypatch):
    """LLaMA-3-8B's d_ff = 14,336: one float64 d_ff² sum is 1.64 GB; 5 layers need 8.2 GB plus one
    batch's float32 product (0.82 GB)."""
    assert 8 * 14_336**2 == pytest.approx(1.64e9, rel=1e-2)
    def model_on(*devices: torch.device) -> SimpleNamespace:  # layer i on devices[i * len(devices) // 8]
        return SimpleNamespace(d_ff=14_336, arch=SimpleNamespace(mlp_out_name=str),
                               module_device=lambda name: devices[int(name) * len(devices) // 8])

    gpu, gpus = torch.device("cuda", 0), (torch.device("cuda", 0), torch.device("cuda", 1))
    layers = [3, 4, 5, 6, 7]
    monkeypatch.setattr(stats, "free_device_bytes", lambda _device: 60 * 10**9)  # 80 GB card, model loaded
    assert set(stats.accumulation_devices(model_on(gpu), layers).values()) == {gpu}
    monkeypatch.setattr(stats, "free_device_bytes", lambda _device: 8 * 10**9)  # 24 GB card, model loaded
    assert set(stats.accumulation_devices(model_on(gpu), layers).values()) == {torch.device("cpu")}
    assert stats.accumulation_devices(model_on(gpu), [4]) == {4: gpu}
    # sharded over two 24 GB cards: layers 3 (first GPU) and 4-7 (second); 1.64 GB + 0.82 GB fit on
    # the first, 4 × 1.64 GB + 0.82 GB do not fit on the second
    expected = {3: gpus[0], **dict.fromkeys(layers[1:], torch.device("cpu"))}
    assert stats.accumulation_devices(model_on(*gpus), layers) == expected
    assert set(stats.accumulation_devices(model_on(torch.device("cpu")), layers).values()) == {torch.device("cpu")}
    assert not stats.fits_on("mps", 8, torch.float64)  # MPS has no float64


def test_sums_accumulate_the_same_wherever_they_are_kept(isolated_cache):
    handle = tiny_model("llama")
    here, n = stats.collect_second_moments(handle, [0, 2], TEXTS, batch_size=2)
    on_cpu, n_cpu = stats.collect_second_moments(handle, [0, 2], TEXTS, batch_size=2, accumulate_on="cpu")
    assert n == n_cpu and all(torch.equal(here[layer], on_cpu[layer]) for layer in (0, 2))
    assert here[0].dtype == torch.float64
    # adding a float32 product to a float64 sum in place widens it first, exactly
    total, product = torch.randn(50, 50, dtype=torch.float64), torch.randn(50, 50)
    assert torch.equal(total.clone().add_(product), total + product.to(torch.float64))


def test_statistics_of_a_bfloat16_model(isolated_cache, corpus_file):
    handle = tiny_model("llama")
    full = stats.second_moment(handle, 1, corpus=corpus_file, n_samples=100, use_cache=False)
    handle.model.to(torch.bfloat16)
    half = stats.second_moment(handle, 1, corpus=corpus_file, n_samples=100, use_cache=False)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert float((half - full).norm() / full.norm()) < 0.05  # the keys themselves are bfloat16

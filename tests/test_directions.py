"""Sentence banks and edit directions: per-token mean embeddings, target - source, file formats."""

from __future__ import annotations

import pytest
import torch

from p2pz.teacher.directions import (
    EditDirection,
    compute_direction,
    embed_sentences,
    text_encoder_fingerprint,
)
from p2pz.teacher.sentences import (
    TEMPLATES,
    clean_sentence,
    make_sentences,
    read_sentences,
    template_sentences,
)
from p2pz.utils.errors import UserError


@pytest.fixture(scope="module")
def text_model(tiny_model_dir):
    from p2pz.teacher.models import load_sd_components

    sd = load_sd_components(tiny_model_dir, components=("tokenizer", "text_encoder"))
    return sd.tokenizer, sd.text_encoder


# --- sentences ---------------------------------------------------------------------------------


def test_templates_many_varied_and_contain_word():
    assert len(set(TEMPLATES)) >= 100
    bank = template_sentences("zebra2", n=300, seed=0)
    assert len(bank) == 300 and len(set(bank)) >= 250
    assert all("zebra2" in s for s in bank)
    assert bank == template_sentences("zebra2", n=300, seed=0)
    assert bank != template_sentences("zebra2", n=300, seed=1)
    # Every template is usable: a large bank hits (nearly) all of them with the word in it.
    assert all("{" not in s for s in template_sentences("cat", n=2000, seed=3))


def test_template_articles_agree():
    bank = template_sentences("apple", n=200, seed=0)
    assert not any("a apple" in s.split(", ")[0] for s in bank)
    assert any("an apple" in s for s in bank)


def test_clean_like_official_but_keep_word():
    assert clean_sentence("A t-shirt (2) on r2d2.", "r2d2") == "A tshirt ( on r2d2"
    assert clean_sentence("3 cats. sitting - here)") == "cats sitting here"


def test_sentence_file(tmp_path):
    f = tmp_path / "cats.txt"
    f.write_text("a cat sitting on a mat.\n\nshort\n  a cat in 3 boxes  \n", encoding="utf-8")
    assert read_sentences(f, "cat") == ["a cat sitting on a mat", "a cat in boxes"]
    assert make_sentences("cat", str(f)) == read_sentences(f, "cat")
    with pytest.raises(UserError, match="does not exist"):
        read_sentences(tmp_path / "missing.txt")


def test_llm_without_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="make-tiny|huggingface-cli|does not exist"):
        make_sentences("cat", "llm", n=4, llm=str(tmp_path / "no-such-llm"))
    with pytest.raises(UserError, match="huggingface-cli download google/flan-t5-xl"):
        make_sentences("cat", "llm", n=4)  # not in the (offline) cache


# --- embeddings and directions -----------------------------------------------------------------


def test_embedding_is_per_token_mean_of_last_hidden_state(text_model):
    tokenizer, text_encoder = text_model
    sentences = template_sentences("cat", n=21, seed=0)
    emb = embed_sentences(tokenizer, text_encoder, sentences, batch_size=4)
    assert emb.shape == (77, text_encoder.config.hidden_size) and emb.dtype == torch.float32
    # The official loop: one sentence at a time, max-length padding, no mask, then the mean.
    with torch.no_grad():
        singles = []
        for s in sentences:
            ids = tokenizer(
                s, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            singles.append(text_encoder(ids)[0])
    torch.testing.assert_close(emb, torch.cat(singles).mean(0), atol=1e-5, rtol=1e-5)


def test_equal_sentences_give_zero_direction(text_model):
    tokenizer, text_encoder = text_model
    same = template_sentences("cat", n=20, seed=0)
    d = compute_direction(tokenizer, text_encoder, same, list(same), source="cat", target="cat")
    assert d.tensor.shape == (77, text_encoder.config.hidden_size)
    assert torch.count_nonzero(d.tensor) == 0


def test_direction_is_target_minus_source(text_model):
    tokenizer, text_encoder = text_model
    cats, dogs = template_sentences("cat", 20), template_sentences("dog", 20)
    d = compute_direction(tokenizer, text_encoder, cats, dogs, source="cat", target="dog", batch_size=7)
    expect = embed_sentences(tokenizer, text_encoder, dogs) - embed_sentences(tokenizer, text_encoder, cats)
    torch.testing.assert_close(d.tensor, expect, atol=1e-5, rtol=0)
    assert d.norm > 0
    # The BOS slot is the same for every sentence (causal encoder): no direction there, as the
    # official cat->dog file.
    assert d.tensor[0].abs().max() < 1e-5
    assert d.metadata["num_source_sentences"] == "20" and d.metadata["num_target_sentences"] == "20"


def test_fingerprint_ignores_dtype_but_not_weights(text_model, tmp_path):
    import copy

    tokenizer, text_encoder = text_model
    fp = text_encoder_fingerprint(tokenizer, text_encoder)
    assert fp == text_encoder_fingerprint(tokenizer, copy.deepcopy(text_encoder).half())
    other = copy.deepcopy(text_encoder)
    with torch.no_grad():
        other.get_input_embeddings().weight[5, 0] += 0.1
    assert fp != text_encoder_fingerprint(tokenizer, other)


def test_safetensors_round_trip(text_model, tmp_path):
    tokenizer, text_encoder = text_model
    d = compute_direction(
        tokenizer, text_encoder, template_sentences("cat", 8), template_sentences("dog2", 9),
        source="cat", target="dog2", model="tiny", metadata={"seed": 0},
    )  # fmt: skip
    path = d.save(tmp_path / "out" / d.name)
    assert path.name == "cat-to-dog2.safetensors"
    back = EditDirection.load(path)
    assert torch.equal(back.tensor, d.tensor)
    assert torch.equal(back.source_embedding, d.source_embedding)
    assert (back.source, back.target) == ("cat", "dog2")
    assert back.metadata["model"] == "tiny"
    assert back.metadata["text_encoder_fingerprint"] == text_encoder_fingerprint(tokenizer, text_encoder)
    assert back.metadata["num_target_sentences"] == "9" and back.metadata["method"]
    assert not [p for p in path.parent.iterdir() if p != path]  # no temporary files left
    back.check_compatible(text_encoder)


def _save_as_if_on_cuda(tensor: torch.Tensor, path, monkeypatch) -> None:
    """torch.save with the storage location recorded as cuda:0, like the official files."""
    import torch.serialization as ser

    with monkeypatch.context() as m:
        m.setattr(ser, "location_tag", lambda storage: "cuda:0")
        torch.save(tensor, path)
    assert b"cuda:0" in path.read_bytes()


def test_official_pt_pair_and_single_file(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    cat = torch.randn(1, 77, 768, generator=g)
    dog = torch.randn(1, 77, 768, generator=g).half()
    _save_as_if_on_cuda(cat, tmp_path / "cat.pt", monkeypatch)
    _save_as_if_on_cuda(dog, tmp_path / "dog.pt", monkeypatch)
    d = EditDirection.load([tmp_path / "cat.pt", tmp_path / "dog.pt"])
    assert (d.source, d.target) == ("cat", "dog")
    assert d.tensor.shape == (77, 768) and d.tensor.dtype == torch.float32
    torch.testing.assert_close(d.tensor, dog.float().mean(0) - cat.mean(0))

    direction = (dog.float() - cat).half()
    _save_as_if_on_cuda(direction, tmp_path / "cat2dog.pt", monkeypatch)
    single = EditDirection.load(tmp_path / "cat2dog.pt")
    assert (single.source, single.target) == ("cat", "dog")
    torch.testing.assert_close(single.tensor, direction[0].float())


def test_bad_direction_files(tmp_path, text_model):
    with pytest.raises(UserError, match="does not exist"):
        EditDirection.load(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a tensor")
    with pytest.raises(UserError, match="cannot read"):
        EditDirection.load(junk)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 20)
    with pytest.raises(UserError, match="cannot read"):
        EditDirection.load(bad)
    wide = EditDirection(torch.zeros(77, 768), "a", "b")
    with pytest.raises(UserError, match="hidden size"):
        wide.check_compatible(text_model[1])


class _Payload:
    """Unpickling this creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import builtins

        return (builtins.open, (self.marker, "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip-format", "legacy-format"])
def test_a_pt_direction_with_a_payload_is_refused_and_never_runs(tmp_path, legacy):
    """Official-style .pt directions are read weights-only: a pickled payload is refused, not run."""
    marker = tmp_path / "payload-ran"
    path = tmp_path / "cat2dog.pt"
    torch.save({"direction": _Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UserError, match="cannot read"):
        EditDirection.load(path)
    with pytest.raises(UserError, match="cannot read"):
        EditDirection.load([path, path])
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an ordinary unpickle runs it
    assert marker.exists()


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600)])
def test_direction_file_follows_the_umask(tmp_path, umask, mode):
    import os
    import stat

    old = os.umask(umask)
    try:
        path = EditDirection(torch.zeros(77, 8), "cat", "dog").save(tmp_path / "new" / "cat-to-dog")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


# --- command line ------------------------------------------------------------------------------


def test_cli_direction(tiny_model_dir, tmp_path, capsys):
    from p2pz.cli.main import main

    out = tmp_path / "dirs"
    argv = [
        "direction",
        "--model",
        str(tiny_model_dir),
        "--source",
        "cat2",
        "--target",
        "dog",
        "--out",
        str(out),
    ]
    assert main([*argv, "--num-sentences", "12"]) == 0
    path = out / "cat2-to-dog.safetensors"
    assert str(path) in capsys.readouterr().out
    d = EditDirection.load(path)
    assert (d.source, d.target, d.metadata["num_source_sentences"]) == ("cat2", "dog", "12")
    assert d.metadata["model"] == str(tiny_model_dir) and d.norm > 0

    # Two sentence files, one per concept; equal files give a zero direction.
    f = tmp_path / "same.txt"
    f.write_text("a photo of a kitten\na kitten on a couch\n", encoding="utf-8")
    assert main([*argv, "--sentences", str(f), str(f)]) == 0
    assert torch.count_nonzero(EditDirection.load(path).tensor) == 0


def test_cli_direction_errors(tiny_model_dir, tmp_path, capsys):
    from p2pz.cli.main import main

    base = ["direction", "--source", "cat", "--target", "dog", "--out", str(tmp_path / "d")]
    assert main([*base, "--model", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([*base, "--model", str(tiny_model_dir), "--sentences", str(tmp_path / "none.txt")]) == 2
    assert "sentence file" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A tiny random T5 with a word-piece vocabulary: stands in for FLAN-T5 (it talks nonsense)."""
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    words = "a the cat dog photo of on in sitting grass couch small white near with and".split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + w, -float(i)) for i, w in enumerate(words)] + [
        (c, -30.0) for c in "abcdefghijklmnopqrstuvwxyz"
    ]
    tokenizer = T5Tokenizer(vocab=vocab + [("▁", -40.0)], extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1,
        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("llm") / "tiny-t5"
    tokenizer.save_pretrained(folder)
    T5ForConditionalGeneration(config).save_pretrained(folder)
    return folder


def test_llm_sentences_with_local_model(tiny_llm):
    from p2pz.teacher.sentences import llm_sentences

    bank = llm_sentences("cat", n=6, seed=0, model=str(tiny_llm), max_length=16)
    assert len(bank) == 6 and all("cat" in s and len(s) >= 10 for s in bank)
    assert not any(ch.isdigit() or ch in ".-)" for s in bank for ch in s)
    assert bank == llm_sentences("cat", n=6, seed=0, model=str(tiny_llm), max_length=16)
    assert bank != llm_sentences("cat", n=6, seed=1, model=str(tiny_llm), max_length=16)


def _cuda_generators() -> list:
    """What the CUDA generators will be: their states on a GPU; without one, the seeds torch.cuda
    queues (``torch.manual_seed`` reseeds every CUDA device once CUDA starts)."""
    if torch.cuda.is_initialized() or torch.cuda.is_available():
        return [state.tolist() for state in torch.cuda.get_rng_state_all()]
    return [call and call[0] for call in torch.cuda._lazy_seed_tracker.get_calls()]


def test_llm_sentences_leave_the_callers_random_streams_alone(tiny_llm):
    """The CPU's generator and CUDA's come out as they went in. On a machine without a GPU the CUDA
    side is the seed torch.cuda queues for its start; the device's own fork/restore runs only on a GPU."""
    from p2pz.teacher.sentences import llm_sentences

    torch.manual_seed(1234)
    torch.rand(3)
    cpu_before, cuda_before = torch.random.get_rng_state(), _cuda_generators()
    bank = llm_sentences("cat", n=4, seed=0, model=str(tiny_llm), max_length=16, progress=False)
    assert torch.equal(torch.random.get_rng_state(), cpu_before)
    assert _cuda_generators() == cuda_before
    assert bank == llm_sentences("cat", n=4, seed=0, model=str(tiny_llm), max_length=16, progress=False)

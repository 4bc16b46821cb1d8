import json
import sys

import pytest
import torch

from wanda_serve.data import Corpus, calibration_batches, evaluation_ids, load_corpus
from wanda_serve.errors import WandaServeError


def test_windows_are_seeded_and_reproducible(tiny_tokenizer):
    corpus = Corpus("t", " ".join(f"word{i}" for i in range(3000)), "")
    first = calibration_batches(corpus, tiny_tokenizer, nsamples=10, seqlen=16, seed=3, batch_size=4)
    again = calibration_batches(corpus, tiny_tokenizer, nsamples=10, seqlen=16, seed=3, batch_size=4)
    other = calibration_batches(corpus, tiny_tokenizer, nsamples=10, seqlen=16, seed=4, batch_size=4)
    assert [b.shape for b in first] == [(4, 16), (4, 16), (2, 16)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))


def test_jsonl_samples_in_file_order_truncated_to_seqlen(tmp_path, tiny_tokenizer):
    texts = ["The cat walked to the river.", "The dog " * 40, "An owl.", "The fox walked."]
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(texts)) + "\n")
    corpus = load_corpus(str(path))
    batches = calibration_batches(corpus, tiny_tokenizer, nsamples=4, seqlen=20, seed=0, batch_size=8)
    samples = [row for batch in batches for row in batch]
    expected = [tiny_tokenizer(t)["input_ids"][:20] for t in texts]
    assert [s.tolist() for s in samples] == expected
    assert len(samples[1]) == 20


def test_jsonl_subset_and_errors(tmp_path, tiny_tokenizer):
    path = tmp_path / "samples.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"sample {i}"}) for i in range(5)))
    batches = calibration_batches(load_corpus(str(path)), tiny_tokenizer, nsamples=3, seqlen=8, seed=0, batch_size=8)
    assert sum(b.shape[0] for b in batches) == 3
    with pytest.raises(WandaServeError, match="holds 5 samples, fewer than --nsamples 6"):
        calibration_batches(load_corpus(str(path)), tiny_tokenizer, nsamples=6, seqlen=8, seed=0, batch_size=8)
    path.write_text('{"text": "fine"}\n{"body": "no text"}\n')
    with pytest.raises(WandaServeError, match=r"samples.jsonl:2: each line must be a JSON object with a 'text' field"):
        load_corpus(str(path))


def test_hub_dataset_without_datasets_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(WandaServeError, match=r"c4 needs the 'datasets' package: pip install 'wanda-serve\[hub-data\]'"):
        load_corpus("c4")


def test_embedded_wikipedia_regions_never_overlap():
    corpus = load_corpus("wiki")
    calibration_articles = set(corpus.calibration.split("\n\n"))
    evaluation_articles = corpus.evaluation.split("\n\n")
    long_paragraphs = [p for p in evaluation_articles if len(p) > 200]
    assert len(long_paragraphs) > 20
    assert not any(p in calibration_articles or p in corpus.calibration for p in long_paragraphs)
    share = len(corpus.evaluation) / (len(corpus.evaluation) + len(corpus.calibration))
    assert 0.10 <= share < 0.2
    assert "[[" not in corpus.evaluation and "{{" not in corpus.evaluation  # markup stripped


def test_evaluation_ids_are_the_whole_evaluation_text(tiny_tokenizer):
    corpus = Corpus("t", "", "The cat walked to the river.")
    assert evaluation_ids(corpus, tiny_tokenizer).tolist() == tiny_tokenizer("The cat walked to the river.")["input_ids"]

"""The embedded code text: the pinned gensim wheel's Python sources, split once into calibration and held-out files."""

import importlib.util
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wanda_serve import data
from wanda_serve.cli import cli
from wanda_serve.data import CODE_EVAL_SHARE, CODE_FILES, load_corpus
from wanda_serve.errors import WandaServeError

GENSIM = Path(importlib.util.find_spec("gensim").submodule_search_locations[0])


def sources() -> list[str]:
    return [(GENSIM / name).read_text(encoding="utf-8") for name in CODE_FILES]


def test_the_fixed_list_is_every_python_file_of_the_pinned_gensim_in_sorted_order():
    assert list(CODE_FILES) == sorted(set(CODE_FILES))
    assert set(CODE_FILES) == {path.relative_to(GENSIM).as_posix() for path in GENSIM.rglob("*.py")}


def test_code_corpus_loads_with_its_name():
    corpus = load_corpus("code")
    assert corpus.name == "code (embedded gensim 4.4.0 Python sources)"
    assert "def " in corpus.calibration and "def " in corpus.evaluation
    assert "import " in corpus.evaluation


def test_calibration_and_evaluation_are_disjoint_runs_of_whole_files():
    corpus, texts = load_corpus("code"), sources()
    split = next(i for i in range(1, len(texts)) if corpus.evaluation == "\n\n".join(texts[i:]))
    assert corpus.calibration == "\n\n".join(texts[:split])  # every file in exactly one region
    held_out = sum(map(len, texts[split:]))
    total = sum(map(len, texts))
    # The last files holding at least 10% of the text: without the first of them, less than 10%.
    assert held_out >= CODE_EVAL_SHARE * total > held_out - len(texts[split])
    long_held_out = [text for text in texts[split:] if len(text) > 2000]
    assert long_held_out and not any(text in corpus.calibration for text in long_held_out)


def test_the_split_is_stable():
    first, again = load_corpus("code"), load_corpus("code")
    assert (first.calibration, first.evaluation) == (again.calibration, again.evaluation)


def test_another_gensim_version_is_refused_with_the_install_command(monkeypatch):
    monkeypatch.setattr(data.metadata, "version", lambda name: "4.3.3")
    with pytest.raises(WandaServeError, match=r"^the embedded code text is gensim 4\.4\.0's Python sources; gensim 4\.3\.3 is "
                                              r"installed: pip install --no-deps gensim==4\.4\.0$"):
        load_corpus("code")


def test_eval_on_the_held_out_code(tiny_model_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(tiny_model_dir), "--data", "code", "--eval-seqlen", "64", "--eval-windows", "1",
                                      "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "on code (embedded gensim 4.4.0 Python sources) (1 x 64 tokens)" in result.output
    perplexity = json.loads(out.read_text())["perplexity"]
    assert perplexity["data"] == "code (embedded gensim 4.4.0 Python sources)"
    assert (perplexity["windows"], perplexity["predicted_tokens"]) == (1, 63) and perplexity["perplexity"] > 1

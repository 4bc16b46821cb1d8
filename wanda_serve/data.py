"""Calibration and evaluation text: the embedded Wikipedia sample, news and code, local files, or hub datasets."""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import torch

from wanda_serve.errors import WandaServeError

EMBEDDED_TEXT = "wiki"
# A second embedded text, not Wikipedia: for measuring quality out of the calibration domain.
EMBEDDED_NEWS = "news"
# A third, not prose: Python source code, for models that write code (held-out code perplexity).
EMBEDDED_CODE = "code"
HUB_DATASETS = ("c4", "wikitext2")
WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_SAMPLE = "test/test_data/lee_background.cor"  # 299 Australian news articles (Lee et al. 2005), one a line
# The last articles, holding at least this share of the text, are held out for evaluation. The news
# corpus is small (~80k tokens) and serves mostly to evaluate, so it holds out half.
WIKI_EVAL_SHARE = 0.10
NEWS_EVAL_SHARE = 0.50
# The code text: the Python sources of the pinned gensim wheel, a fixed list (by directory, then file
# name without .py) so that the text is the same wherever that version is installed. Each file is one
# article, in sorted path order; the last files holding 10% of the text are held out.
CODE_GENSIM_VERSION = "4.4.0"
CODE_SOURCES = {
    "": "__init__ downloader interfaces matutils nosy utils",
    "corpora": "__init__ bleicorpus csvcorpus dictionary hashdictionary indexedcorpus lowcorpus malletcorpus mmcorpus "
               "opinosiscorpus sharded_corpus svmlightcorpus textcorpus ucicorpus wikicorpus",
    "models": "__init__ _fasttext_bin atmodel basemodel bm25model callbacks coherencemodel doc2vec ensemblelda fasttext "
              "hdpmodel keyedvectors lda_dispatcher lda_worker ldamodel ldamulticore ldaseqmodel logentropy_model "
              "lsi_dispatcher lsi_worker lsimodel nmf normmodel phrases poincare rpmodel tfidfmodel translation_matrix word2vec",
    "parsing": "__init__ porter preprocessing",
    "scripts": "__init__ benchmark glove2word2vec make_wiki make_wiki_online make_wiki_online_nodebug make_wikicorpus "
               "package_info segment_wiki word2vec2tensor word2vec_standalone",
    "similarities": "__init__ annoy docsim levenshtein nmslib termsim",
    "test": "__init__ basetmtests simspeed simspeed2 svd_error test_aggregation test_api test_atmodel test_big test_bm25model "
            "test_coherencemodel test_corpora test_corpora_dictionary test_corpora_hashdictionary test_datatype "
            "test_direct_confirmation test_doc2vec test_ensemblelda test_fasttext test_glove2word2vec test_hdpmodel "
            "test_indirect_confirmation test_keyedvectors test_lda_callback test_ldamodel test_ldaseqmodel test_lee "
            "test_logentropy_model test_lsimodel test_matutils test_miislita test_nmf test_normmodel test_parsing test_phrases "
            "test_poincare test_probability_estimation test_rpmodel test_scripts test_segmentation test_sharded_corpus "
            "test_similarities test_similarity_metrics test_text_analysis test_tfidfmodel test_tmdiff "
            "test_translation_matrix test_utils test_word2vec utils",
    "topic_coherence": "__init__ aggregation direct_confirmation_measure indirect_confirmation_measure probability_estimation "
                       "segmentation text_analysis",
}
CODE_FILES = tuple(sorted(f"{directory}/{name}.py".lstrip("/") for directory, names in CODE_SOURCES.items() for name in names.split()))
CODE_EVAL_SHARE = 0.10


@dataclass
class Corpus:
    """calibration: one text to draw windows from, or a list of ready samples (JSONL lines)."""

    name: str
    calibration: str | list[str]
    evaluation: str


def load_corpus(spec: str) -> Corpus:
    """'wiki', 'news', 'code' (embedded), 'c4', 'wikitext2', a .jsonl file with a `text` field per line, or a plain-text file."""
    if spec == EMBEDDED_TEXT:
        return Corpus("wiki (embedded English Wikipedia sample)", *_split(_wiki_articles(_gensim_data(WIKI_SAMPLE)), WIKI_EVAL_SHARE))
    if spec == EMBEDDED_NEWS:
        articles = _read_text(_gensim_data(NEWS_SAMPLE)).splitlines()
        return Corpus("news (embedded Lee news corpus)", *_split([a.strip() for a in articles if a.strip()], NEWS_EVAL_SHARE))
    if spec == EMBEDDED_CODE:
        return Corpus(f"code (embedded gensim {CODE_GENSIM_VERSION} Python sources)", *_split(_code_files(), CODE_EVAL_SHARE))
    if spec in HUB_DATASETS:
        return _hub_corpus(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise WandaServeError(f"no such text file: {spec} (or use wiki, news, c4, wikitext2)")
    text = _read_text(path)
    if path.suffix == ".jsonl":
        samples = _parse_jsonl(path, text)
        return Corpus(str(path), samples, "\n\n".join(samples))
    if not text.strip():
        raise WandaServeError(f"text file {path} is empty")
    return Corpus(str(path), text, text)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise WandaServeError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason}); give a .txt or .jsonl file") from e
    except OSError as e:
        raise WandaServeError(f"cannot read {path}: {e.strerror or e}") from e


def _parse_jsonl(path: Path, text: str) -> list[str]:
    samples = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WandaServeError(f"{path}:{number}: each line must be a JSON object with a 'text' field") from e
        if not isinstance(text, str) or not text:
            raise WandaServeError(f"{path}:{number}: 'text' must be a non-empty string")
        samples.append(text)
    if not samples:
        raise WandaServeError(f"{path} holds no samples")
    return samples


def _gensim_data(relative: str) -> Path:
    """A file of the gensim wheel's test data, where the embedded texts come from."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise WandaServeError("the embedded texts need the package gensim: pip install --no-deps gensim")
    return Path(spec.submodule_search_locations[0]) / relative


def _code_files() -> list[str]:
    """The text of each file of CODE_FILES, in that order, from the installed gensim (which must be the pinned version)."""
    root = _gensim_data("")
    install = f"pip install --no-deps gensim=={CODE_GENSIM_VERSION}"
    try:
        version = metadata.version("gensim")
    except metadata.PackageNotFoundError:
        version = "unknown"  # found by find_spec but without its metadata
    if version != CODE_GENSIM_VERSION:
        raise WandaServeError(f"the embedded code text is gensim {CODE_GENSIM_VERSION}'s Python sources; gensim {version} "
                              f"is installed: {install}")
    missing = [name for name in CODE_FILES if not (root / name).is_file()]
    if missing:
        raise WandaServeError(f"gensim {version} at {root} lacks {len(missing)} of its Python sources ({missing[0]} first): "
                              f"{install} --force-reinstall")
    return [_read_text(root / name) for name in CODE_FILES]


def _split(articles: list[str], eval_share: float) -> tuple[str, str]:
    """Calibration and evaluation regions: the last articles holding at least eval_share of the text are held out."""
    total = sum(len(a) for a in articles)
    held_out, split = 0, len(articles)
    while held_out < eval_share * total:
        split -= 1
        held_out += len(articles[split])
    return "\n\n".join(articles[:split]), "\n\n".join(articles[split:])


@lru_cache(maxsize=1)
def _wiki_articles(path: Path) -> list[str]:
    import mwparserfromhell

    articles = []
    with bz2.open(path) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            text = element.findtext("{*}revision/{*}text") or ""
            if element.findtext("{*}ns") == "0" and not text.lstrip().upper().startswith("#REDIRECT"):
                plain = mwparserfromhell.parse(text).strip_code()
                plain = re.sub(r"\n\s*\n+", "\n\n", plain).strip()
                title = element.findtext("{*}title")
                articles.append(f"{title}\n\n{plain}")
            element.clear()
    return articles


def _hub_corpus(name: str) -> Corpus:
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise WandaServeError(f"{name} needs the 'datasets' package: pip install 'wanda-serve[hub-data]'") from e
    try:
        if name == "wikitext2":
            train = load_dataset("wikitext", "wikitext-2-raw-v1", split="train")
            test = load_dataset("wikitext", "wikitext-2-raw-v1", split="test")
            return Corpus(name, "\n\n".join(train["text"]), "\n\n".join(test["text"]))
        # The shards the Wanda reference code uses.
        train = load_dataset("allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train")
        valid = load_dataset("allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"}, split="validation")
        return Corpus(name, "\n\n".join(train["text"][:20000]), " ".join(valid["text"][:1100]))
    except Exception as e:  # datasets raises many kinds for an unreachable hub
        raise WandaServeError(f"cannot load {name} from the Hugging Face hub: {str(e).strip().splitlines()[0]}") from e


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_batches(
    corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int
) -> list[torch.Tensor]:
    """`nsamples` samples of at most `seqlen` tokens, seeded, grouped into batches of equal length."""
    if nsamples < 1 or seqlen < 2:
        raise WandaServeError(f"need nsamples >= 1 and seqlen >= 2, got {nsamples} and {seqlen}")
    generator = torch.Generator().manual_seed(seed)
    if isinstance(corpus.calibration, list):
        if nsamples > len(corpus.calibration):
            raise WandaServeError(f"{corpus.name} holds {len(corpus.calibration)} samples, fewer than --nsamples {nsamples}")
        order = range(nsamples) if nsamples == len(corpus.calibration) else torch.randperm(len(corpus.calibration), generator=generator)[:nsamples].tolist()
        samples = [_tokenize(tokenizer, corpus.calibration[i])[:seqlen] for i in order]
    else:
        ids = _tokenize(tokenizer, corpus.calibration)
        if ids.numel() < seqlen:
            raise WandaServeError(f"calibration text {corpus.name} is too short: {ids.numel()} tokens, windows need {seqlen}")
        starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=generator).tolist()
        samples = [ids[s : s + seqlen] for s in starts]
    batches: list[list[torch.Tensor]] = []
    for sample in samples:
        if batches and len(batches[-1]) < batch_size and batches[-1][0].numel() == sample.numel():
            batches[-1].append(sample)
        else:
            batches.append([sample])
    return [torch.stack(batch) for batch in batches]


def evaluation_ids(corpus: Corpus, tokenizer) -> torch.Tensor:
    return _tokenize(tokenizer, corpus.evaluation)

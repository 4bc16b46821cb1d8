"""Calibration and evaluation text: the embedded Wikipedia sample, local files, or hub datasets."""

from __future__ import annotations

import bz2
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from wanda_serve.errors import WandaServeError

EMBEDDED_TEXT = "wiki"
# A second embedded text, not Wikipedia: for measuring quality out of the calibration domain.
EMBEDDED_NEWS = "news"
HUB_DATASETS = ("c4", "wikitext2")
WIKI_SAMPLE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
NEWS_SAMPLE = "test/test_data/lee_background.cor"  # 299 Australian news articles (Lee et al. 2005), one a line
# The last articles, holding at least this share of the text, are held out for evaluation. The news
# corpus is small (~80k tokens) and serves mostly to evaluate, so it holds out half.
WIKI_EVAL_SHARE = 0.10
NEWS_EVAL_SHARE = 0.50


@dataclass
class Corpus:
    """calibration: one text to draw windows from, or a list of ready samples (JSONL lines)."""

    name: str
    calibration: str | list[str]
    evaluation: str


def load_corpus(spec: str) -> Corpus:
    """'wiki', 'news' (embedded), 'c4', 'wikitext2', a .jsonl file with a `text` field per line, or a plain-text file."""
    if spec == EMBEDDED_TEXT:
        return Corpus("wiki (embedded English Wikipedia sample)", *_split(_wiki_articles(_gensim_data(WIKI_SAMPLE)), WIKI_EVAL_SHARE))
    if spec == EMBEDDED_NEWS:
        articles = _read_text(_gensim_data(NEWS_SAMPLE)).splitlines()
        return Corpus("news (embedded Lee news corpus)", *_split([a.strip() for a in articles if a.strip()], NEWS_EVAL_SHARE))
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
    corpus: Corpus, tokenizer, nsamples: int, seqlen: int, seed: int, batch_size: int = 8
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

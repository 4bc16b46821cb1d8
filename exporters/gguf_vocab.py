"""The tokenizer of a GGUF export: a byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model holds it.

Follows llama.cpp's `convert_hf_to_gguf.py` (`TextModel.get_vocab_base`, `_set_vocab_gpt2`), with
merges and special tokens from `gguf.SpecialVocab`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass

import gguf

from wanda_serve.errors import WandaServeError


@dataclass
class Vocabulary:
    """A byte-level BPE tokenizer as llama.cpp's "gpt2" tokenizer model holds it."""

    tokens: list[str]
    token_types: list[int]
    pre: str  # tokenizer.ggml.pre: which pre-tokenizer llama.cpp runs before the merges
    special: gguf.SpecialVocab  # merges, special token ids, add_bos/eos, chat template

    def add_to(self, writer: gguf.GGUFWriter) -> None:
        """As convert_hf_to_gguf.py's TextModel._set_vocab_gpt2."""
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        self.special.add_to_gguf(writer, quiet=True)

    def summary(self) -> dict:
        return {"model": "gpt2", "pre": self.pre, "tokens": len(self.tokens), "merges": len(self.special.merges),
                "special_token_ids": self.special.special_token_ids, "adds": self.special.add_special_token,
                "chat_template": self.special.chat_template is not None}


def read_vocabulary(tokenizer, config) -> Vocabulary:
    """The tokenizer as llama.cpp takes it, or why it cannot (only byte-level BPE is exported)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    definition = json.loads(backend.to_str()) if backend is not None else {}
    model = definition.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise WandaServeError(
            "GGUF export supports byte-level BPE tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2 style) only; "
            f"this one is {model.get('type') or type(tokenizer).__name__}"
            + (" with byte fallback (SentencePiece style)" if model.get("byte_fallback") else "")
        )
    tokens, token_types = token_list(tokenizer, config.vocab_size)
    with tempfile.TemporaryDirectory(prefix="wanda-serve-gguf-vocab.") as directory:
        # SpecialVocab reads the saved files as llama.cpp's converter does: tokenizer.json (merges,
        # post-processor), tokenizer_config.json (special tokens, add_bos, chat template), config.json.
        tokenizer.save_pretrained(directory)
        config.save_pretrained(directory)
        special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise WandaServeError("GGUF export: the tokenizer has no BPE merges to write")
    # Whether llama.cpp adds BOS/EOS, as the source tokenizer does (SpecialVocab only guesses it from the
    # files, and llama.cpp's default depends on the pre-tokenizer).
    ids = tokenizer("a")["input_ids"]
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id]
    special.add_special_token["eos"] = tokenizer.eos_token_id is not None and ids[-1:] == [tokenizer.eos_token_id]
    return Vocabulary(tokens, token_types, pre_tokenizer_name(definition.get("pre_tokenizer")), special)


def token_list(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Every id below vocab_size, as convert_hf_to_gguf.py's TextModel.get_vocab_base lists them: ids the
    tokenizer lacks become UNUSED "[PAD{id}]" (the embedding has rows for them), added tokens CONTROL
    when special (or looking special) and USER_DEFINED otherwise."""
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise WandaServeError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's vocabulary of {vocab_size}")
    reverse = {index: token for token, index in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        token = reverse.get(index)
        if token is None:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if token in added:
            if not decoder[index].normalized:  # llama.cpp takes added tokens pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[index].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, [int(t) for t in types]


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf.py's TextModel.does_token_look_special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>")) or (token.startswith("<unused") and token.endswith(">")))


def pre_tokenizer_name(definition: dict | None) -> str:
    """llama.cpp's name (tokenizer.ggml.pre) for the tokenizer's pre-tokenizer.

    GPT-2's own (ByteLevel with its built-in regex) is "gpt-2". A split by a regex before a plain
    ByteLevel is looked up in transformers' table of llama.cpp pre-tokenizers and their regexes
    (GGUF_PRE_TOKENIZER_SPLITS, what its GGUF reader rebuilds a tokenizer from), so that the name
    written is one llama.cpp knows and the read-back check means something. llama.cpp's converter
    identifies pre-tokenizers by hashing the tokens of a test text against a table of known models;
    that table lives only in its script.
    """
    definition = definition or {}
    if definition.get("type") == "ByteLevel" and definition.get("use_regex", True):
        return "gpt-2"
    steps = definition.get("pretokenizers", []) if definition.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("behavior") == "Isolated"
            and not steps[0].get("invert") and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        try:
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError as e:
            raise WandaServeError(
                "GGUF export of a tokenizer that splits by a regex needs transformers' table of llama.cpp "
                "pre-tokenizers (transformers.integrations.gguf, in transformers 5); upgrade transformers"
            ) from e

        regex = (steps[0].get("pattern") or {}).get("Regex")
        for name, split in GGUF_PRE_TOKENIZER_SPLITS.items():
            if split == regex:
                return name
    raise WandaServeError(
        "GGUF export: the tokenizer's pre-tokenizer is not one llama.cpp knows by name "
        f"({json.dumps(definition)[:120]}); supported: GPT-2's byte-level split and the regex splits of "
        "Llama 3, Qwen2 and the other models transformers' GGUF reader lists"
    )

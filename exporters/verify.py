"""What every export shares: PyTorch reference outputs to check against, dtype casts, file digests."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import hashlib
from pathlib import Path

import torch

from wanda_serve.contract import GREEDY_TOKENS, PROMPTS
from wanda_serve.errors import WandaServeError


class ExportCheckFailed(WandaServeError):
    """The runtime did not reproduce PyTorch; the export is removed."""




def prompt_batch(tokenizer, prompts=PROMPTS) -> dict[str, torch.Tensor]:
    """The fixed prompts, left-padded to one length, as generation runtimes expect."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        return dict(tokenizer(list(prompts), return_tensors="pt", padding=True))
    finally:
        tokenizer.padding_side = side


@torch.no_grad()
def torch_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch, use_cache=False).logits.float()


@torch.no_grad()
def torch_greedy(model, tokenizer, prompts=PROMPTS, new_tokens: int = GREEDY_TOKENS) -> list[list[int]]:
    """Greedy continuations, prompt by prompt, through the KV cache; end-of-sequence neither stops nor is masked."""
    continuations = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
        out = model(input_ids=ids, use_cache=True)
        generated = []
        for _ in range(new_tokens):
            token = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            generated.append(int(token))
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
        continuations.append(generated)
    return continuations


def tokens_agreeing(continuations: list[list[int]], reference: list[list[int]]) -> list[int]:
    """Per prompt, how many leading tokens of a continuation equal the reference's."""
    return [next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), len(r)) for c, r in zip(continuations, reference)]


def cast_parameters(model, dtype: torch.dtype):
    """Cast parameters only, in place: buffers such as rotary inv_freq stay fp32, as from_pretrained(dtype=...) leaves them.

    One at a time, each freed as it is cast: narrowing casts go smallest first and widening ones
    largest first, so that a large tensor's two copies never coincide with the peak.
    """
    widening = torch.empty(0, dtype=dtype).element_size() > next(model.parameters()).element_size()
    for param in sorted(model.parameters(), key=lambda p: p.numel(), reverse=widening):
        param.data = param.data.to(dtype)
    return model


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def file_digests(directory: Path) -> dict[str, dict]:
    return {path.name: {"bytes": path.stat().st_size, "sha256": file_sha256(path)}
            for path in sorted(p for p in directory.iterdir() if p.is_file())}


def release_memory() -> None:
    """Collect what is unreachable and hand freed heap pages back to the system.

    glibc keeps the pages of freed tensors smaller than its mmap threshold (which grows up to 32 MB as
    large tensors are freed) inside its heap, where a later allocation of another size (onnxruntime's
    session after the PyTorch model) does not fit them: the process would hold both.
    """
    gc.collect()
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    if trim is not None:  # glibc only
        trim(0)

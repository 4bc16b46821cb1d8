"""Text generation on onnxruntime with the KV cache of a graph written by exporters.onnx_export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from wanda_serve.errors import WandaServeError

ORT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def require_onnx() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise WandaServeError(f"ONNX export needs {', '.join(missing)}: pip install 'wanda-serve[onnx]' (or [onnx-gpu])")


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def choose_providers(provider: str) -> list[str]:
    """'auto': CUDA when onnxruntime-gpu sees a GPU, else CPU; or 'cpu' / 'cuda' explicitly."""
    available = available_providers()
    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider == "cuda" and "CUDAExecutionProvider" not in available:
        raise WandaServeError(f"onnxruntime has no CUDA provider here (available: {', '.join(available)}); install onnxruntime-gpu on a machine with a GPU")
    if provider in ("cuda", "auto") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if provider != "auto":
        raise WandaServeError(f"unknown provider {provider!r}: use auto, cpu or cuda")
    return ["CPUExecutionProvider"]


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Position ids as transformers computes them for left-padded batches."""
    positions = np.cumsum(mask, axis=-1) - 1
    positions[mask == 0] = 1
    return positions


class OnnxCausalLM:
    """One ONNX graph: (input_ids, attention_mask, position_ids, past_key_values.*) -> (logits, present.*).

    Prefill passes an empty past (length 0); each decode step passes the previous presents.
    """

    def __init__(self, path: Path | str, provider: str = "auto"):
        require_onnx()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise WandaServeError(f"no such ONNX model: {path}")
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        providers = choose_providers(provider)
        # onnxruntime's load errors (Fail, InvalidProtobuf, InvalidGraph, NoSuchFile, ...) derive from
        # Exception only; these are all of them.
        load_errors = tuple(v for v in vars(ort_errors).values() if isinstance(v, type) and issubclass(v, Exception))
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except load_errors as e:
            raise WandaServeError(f"cannot load ONNX model {path}: {str(e).strip().splitlines()[0]}") from e
        past = [i for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if not past or past[0].type not in ORT_DTYPES:
            raise WandaServeError(f"{path} is not a decoder graph with a KV cache written by `wanda-serve export onnx`")
        self.past_names = [i.name for i in past]
        self.kv_heads, self.head_dim = past[0].shape[1], past[0].shape[3]
        self.dtype = ORT_DTYPES[past[0].type]

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=self.dtype) for _ in self.past_names]

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: list[np.ndarray]):
        feed = {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask.astype(np.int64),
                "position_ids": position_ids.astype(np.int64), **dict(zip(self.past_names, past))}
        logits, *present = self.session.run(None, feed)
        return logits, present

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
        """Prefill logits (B, T, V) of a (left-padded) batch."""
        mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
        logits, _ = self.forward(input_ids, mask, positions_from_mask(mask), self.empty_past(input_ids.shape[0]))
        return logits

    def logits_fn(self):
        """For wanda_serve.evaluate.perplexity."""
        return lambda window: torch.from_numpy(self.logits(window.numpy()).astype(np.float32))

    def generate(
        self, input_ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
        seed: int = 0, stop_ids: tuple[int, ...] = (),
    ) -> list[int]:
        """Greedy (temperature 0) or nucleus-sampled continuation of one prompt."""
        rng = np.random.default_rng(seed)
        ids = np.array([input_ids], dtype=np.int64)
        mask = np.ones_like(ids)
        logits, past = self.forward(ids, mask, positions_from_mask(mask), self.empty_past(1))
        generated = []
        for _ in range(max_new_tokens):
            token = _next_token(logits[0, -1].astype(np.float32), temperature, top_p, rng)
            generated.append(token)
            if token in stop_ids:
                break
            mask = np.concatenate([mask, np.ones((1, 1), np.int64)], axis=1)
            logits, past = self.forward(np.array([[token]]), mask, mask.sum(-1, keepdims=True) - 1, past)
        return generated


def _next_token(logits: np.ndarray, temperature: float, top_p: float, rng: np.random.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits / temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")
    keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest set whose mass reaches top_p
    kept = order[keep]
    return int(rng.choice(kept, p=probs[kept] / probs[kept].sum()))

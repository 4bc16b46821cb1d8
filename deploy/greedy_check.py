"""Does the server compute what the checkpoint says? Its greedy answers, checked against transformers.

The server generates greedily; transformers (float32, same files) then reads the prompt plus the
server's tokens in one pass, so every position of the server's answer is judged against the
reference's own next-token distribution. vLLM serves in bf16/fp16, where nearly tied tokens flip
and the continuations then part ways for good, so exact equality says little after the first flip;
what must hold is that every token the server chose is the reference's choice or within a small
log-probability of it. A broken export (wrong weights, layout or tokenizer) picks tokens the
reference finds unlikely at once.
"""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from deploy.client import Endpoint, Request, greedy_token_ids
from wanda_serve.contract import GREEDY_TOKENS, PROMPTS

# bf16 serving moves SmolLM2's log-probabilities by up to about 0.3 nats (docs/deploy_benchmark.md);
# a broken export picks tokens several nats below the reference's choice.
MAX_LOGPROB_GAP = 1.0


@torch.no_grad()
def check_greedy(endpoint: Endpoint, checkpoint, tokenizer, prompts=PROMPTS, new_tokens: int = GREEDY_TOKENS) -> dict:
    """Judge the server's greedy continuations of `prompts` with transformers on `checkpoint`."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    answers = []
    for prompt in prompts:
        prompt_ids = tokenizer(prompt)["input_ids"]
        served = greedy_token_ids(endpoint, Request(tuple(prompt_ids), new_tokens))
        logits = model(input_ids=torch.tensor([prompt_ids + served])).logits[0, len(prompt_ids) - 1:-1]  # (new_tokens, V)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        reference = logprobs.argmax(-1)
        gaps = logprobs.max(-1).values - logprobs[torch.arange(len(served)), torch.tensor(served)]
        differs = (reference != torch.tensor(served)).nonzero()
        answers.append({
            "prompt": prompt,
            "served_tokens": served,
            "served_text": tokenizer.decode(served),
            "tokens_equal_to_reference_greedy": int(differs[0]) if len(differs) else len(served),
            "max_logprob_gap": float(gaps.max()),
        })
    worst = max(answer["max_logprob_gap"] for answer in answers)
    return {
        "passed": worst <= MAX_LOGPROB_GAP,
        "rule": f"every served token within {MAX_LOGPROB_GAP} nats of the float32 transformers argmax at its position",
        "max_logprob_gap": worst,
        "answers": answers,
    }

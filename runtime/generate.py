"""The decoding loop over a compiled model's @prefill and @decode programs.

Greedy or sampled (temperature, then top-k, then top-p, as Hugging Face
applies them), stopping on EOS. Sequences of different lengths come left
padded with an attention mask, as for `transformers`' `generate`; positions
count real tokens only, and the cache mask hides the padding slots. The
output is `transformers`-shaped: the prompt followed by the new tokens, with
finished sequences padded by `pad_token_id`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..ir.errors import PlaitError


class GenerateError(PlaitError):
    pass


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def check(self) -> None:
        if self.temperature <= 0:
            raise GenerateError(
                f"temperature must be > 0 (got {self.temperature}); "
                "for deterministic decoding use do_sample=False"
            )
        if self.top_k is not None and self.top_k < 1:
            raise GenerateError(f"top_k must be >= 1 (got {self.top_k})")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1] (got {self.top_p})")

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """The next token of each row of `logits` (batch x vocab, float32)."""
        if not self.do_sample:
            return logits.argmax(-1)
        scores = logits / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None and self.top_p < 1:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(-1).cumsum(-1)
            drop = cumulative <= 1 - self.top_p
            drop[..., -1] = False  # keep the most likely token
            scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_request(
    batch: int,
    max_length: int,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None,
    sampling: Sampling,
) -> None:
    """Raise a GenerateError unless the request fits the compiled cache."""
    sampling.check()
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise GenerateError("input_ids must be a 2-D tensor of token ids (batch x prompt length)")
    rows, prompt = input_ids.shape
    if rows > batch:
        raise GenerateError(
            f"a batch of {rows} sequences, but the model was compiled for at most {batch}; "
            f"compile it with batch={rows} or generate in smaller batches"
        )
    if max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be >= 1 (got {max_new_tokens})")
    if prompt < 1:
        raise GenerateError("the prompt is empty; give each sequence at least one token")
    needed = prompt + max_new_tokens - 1  # the last new token is never fed back
    if needed > max_length:
        raise GenerateError(
            f"a prompt of {prompt} tokens plus {max_new_tokens} new tokens needs {needed} cache "
            f"slots, but the cache holds {max_length}; compile with max_length >= {needed}, or "
            "shorten the prompt or max_new_tokens"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise GenerateError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids "
            f"{tuple(input_ids.shape)}; they must match"
        )


def generate(
    run: Callable[..., Callable[[], torch.Tensor]],
    batch: int,
    max_length: int,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    sampling: Sampling = Sampling(),
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """`run(group, function, *inputs)` starts the compiled program `function`
    ("prefill" or "decode") on the cache's group of sequences `group` and
    returns a function that gives its logits; the cache holds `groups` groups
    of batch / groups sequences of `max_length` slots. Each group decodes on
    its own; a group's next step starts as soon as its logits are in, after
    the other groups' steps started (pipeline stages run one group while the
    next stage runs another)."""
    check_request(batch, max_length, input_ids, max_new_tokens, attention_mask, sampling)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
    generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
    size = batch // groups
    loops = {  # a group without a caller's sequence does not run
        g: _decoding(size, max_length, rows, mask, max_new_tokens, sampling, generator, eos, pad)
        for g, (rows, mask) in enumerate(
            zip(input_ids.cpu().split(size), attention_mask.cpu().split(size))
        )
    }
    pending = {g: run(g, *next(loop)) for g, loop in loops.items()}  # the prefills
    new_tokens: dict[int, torch.Tensor] = {}
    while pending:
        for g in list(pending):
            logits = pending.pop(g)()
            try:
                pending[g] = run(g, *loops[g].send(logits))
            except StopIteration as done:
                new_tokens[g] = done.value
    longest = max(t.shape[1] for t in new_tokens.values())
    padded = [
        torch.nn.functional.pad(new_tokens[g], (0, longest - new_tokens[g].shape[1]), value=pad)
        for g in sorted(new_tokens)
    ]
    return torch.cat([input_ids.cpu(), torch.cat(padded)], 1)


def _decoding(
    batch: int,
    max_length: int,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling,
    generator: torch.Generator | None,
    eos: torch.Tensor,
    pad: int,
):
    """One group's decoding loop, as a generator: yields (function, *inputs),
    is sent each program's logits, returns the new tokens (rows x steps)."""
    rows, prompt = input_ids.shape
    # the cache's rows beyond the caller's batch run on pad tokens and are dropped
    ids = torch.full((batch, prompt), pad, dtype=torch.long)
    ids[:rows] = input_ids
    mask = torch.zeros(batch, prompt, dtype=torch.long)
    mask[:rows] = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache_mask = torch.zeros(batch, max_length, dtype=torch.long)
    cache_mask[:, :prompt] = mask
    lengths = mask.sum(-1)

    # attention reads the first `context` slots: the prompt, then one more per step
    logits = yield ("prefill", ids, positions, torch.arange(prompt), cache_mask[:, :prompt])
    unfinished = torch.ones(rows, dtype=torch.bool)
    new_tokens = []
    for step in range(max_new_tokens):
        chosen = sampling.choose(logits[:rows, -1].float().cpu(), generator)
        chosen = torch.where(unfinished, chosen, torch.full_like(chosen, pad))
        new_tokens.append(chosen)
        unfinished &= ~torch.isin(chosen, eos)
        if not unfinished.any() or step == max_new_tokens - 1:
            break
        slot = prompt + step
        fed = torch.full((batch, 1), pad, dtype=torch.long)
        fed[:rows, 0] = chosen
        cache_mask[:, slot] = 1
        context = cache_mask[:, : slot + 1]
        logits = yield ("decode", fed, lengths[:, None].clone(), torch.tensor([slot]), context)
        lengths += 1
    return torch.stack(new_tokens, 1)

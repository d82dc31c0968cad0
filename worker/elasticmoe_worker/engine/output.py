"""Turn sampled token ids into streamed text: incremental detokenization, stop strings,
and the finish decision for one request.

Text is emitted as deltas. Two kinds of text are held back until they are settled: a
trailing partial UTF-8 character (byte-level tokenizers split characters across tokens) and,
when stop strings are set, a tail that could still become the start of one. The stop string
itself is never emitted (OpenAI semantics).
"""

from __future__ import annotations

from elasticmoe_worker.engine import types


class Detokenizer:
    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.emitted = 0

    def update(self, output_token_ids: list[int]) -> tuple[str, bool]:
        """Re-decode the output so far; -> (new text safe to emit, a stop string was hit)."""
        text = self.tokenizer.decode(output_token_ids, skip_special_tokens=True)
        if self.stop:
            search_from = max(0, self.emitted - self.holdback)
            hits = [i for i in (text.find(s, search_from) for s in self.stop) if i >= 0]
            if hits:
                self.text = text[: min(hits)]
                return self.flush(), True
        self.text = text
        safe = len(text) - self.holdback
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        if safe <= self.emitted:
            return "", False
        delta = text[self.emitted:safe]
        self.emitted = safe
        return delta, False

    def flush(self) -> str:
        """Everything not yet emitted (at the end of the request)."""
        delta = self.text[self.emitted:]
        self.emitted = len(self.text)
        return delta


def finish_reason(
    output_token_ids: list[int],
    num_prompt_tokens: int,
    params: types.SamplingParams,
    eos_token_ids: frozenset[int],
    max_model_len: int,
) -> types.FinishReason | None:
    """Decide after each new token whether the request is done (stop strings aside)."""
    if not params.ignore_eos and output_token_ids and output_token_ids[-1] in eos_token_ids:
        return types.FinishReason.STOP
    if len(output_token_ids) >= params.max_tokens:
        return types.FinishReason.LENGTH
    if num_prompt_tokens + len(output_token_ids) >= max_model_len:
        return types.FinishReason.LENGTH
    return None

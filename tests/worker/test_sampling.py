"""Sampler and output processing: seeded reproducibility, top-k/top-p cuts, stop strings."""

from __future__ import annotations

import pytest
import torch

from elasticmoe_worker.engine import output, sampling, types


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 1.0]])
    p = types.SamplingParams(temperature=0.0)
    assert sampling.sample(logits, [p, p], [None, None]) == [1, 0]


def test_seeded_sampling_is_reproducible_and_independent_of_batch():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    p = types.SamplingParams(temperature=1.0, seed=42)

    def draw(rows):
        gens = [torch.Generator().manual_seed(42) for _ in rows]
        return [sampling.sample(logits[rows], [p] * len(rows), gens)[rows.index(0)] for _ in range(1)]

    alone = [sampling.sample(logits[[0]], [p], [torch.Generator().manual_seed(42)])[0] for _ in range(5)]
    assert len(set(alone)) == 1
    assert draw([0, 1, 2]) == [alone[0]]


def test_top_k_1_is_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    p = types.SamplingParams(temperature=1.0, top_k=1)
    g = torch.Generator().manual_seed(0)
    assert sampling.sample(logits, [p] * 4, [g] * 4) == logits.argmax(-1).tolist()


def test_top_p_keeps_only_the_nucleus():
    # probabilities ~ [0.7, 0.2, 0.1]: top_p 0.6 keeps the first token alone, 0.8 the first two
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]]))
    g = torch.Generator().manual_seed(0)
    assert {sampling.sample(logits, [types.SamplingParams(top_p=0.6)], [g])[0] for _ in range(50)} == {0}
    assert {sampling.sample(logits, [types.SamplingParams(top_p=0.8)], [g])[0] for _ in range(200)} == {0, 1}


@pytest.mark.parametrize("kw, field", [
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -3}, "max_tokens"), ({"temperature": -1.0}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"), ({"seed": -1}, "seed"), ({"stop": ("",)}, "stop"),
])
def test_sampling_params_validation_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        types.SamplingParams(**kw)


class _CharTokenizer:
    """One character per token id (ord), enough to test the detokenizer logic."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


def _feed(detok, text):
    ids, out, stopped = [], [], False
    for ch in text:
        ids.append(ord(ch))
        delta, stopped = detok.update(ids)
        out.append(delta)
        if stopped:
            break
    return "".join(out), stopped


def test_stop_string_truncates_and_is_never_emitted():
    text, stopped = _feed(output.Detokenizer(_CharTokenizer(), ("END",)), "hello ENDworld")
    assert (text, stopped) == ("hello ", True)


def test_partial_stop_string_is_held_back_then_released():
    detok = output.Detokenizer(_CharTokenizer(), ("STOP",))
    text, stopped = _feed(detok, "a STO")
    assert not stopped and text == "a "  # "STO" might still become STOP
    assert text + detok.flush() == "a STO"


def test_without_stop_strings_everything_streams():
    text, stopped = _feed(output.Detokenizer(_CharTokenizer(), ()), "abc")
    assert (text, stopped) == ("abc", False)


def test_incomplete_utf8_is_held_back():
    class T:
        def decode(self, ids, skip_special_tokens=True):
            return "ok\ufffd" if len(ids) == 1 else "ok\u00e9"

    d = output.Detokenizer(T(), ())
    assert d.update([1]) == ("ok", False)
    assert d.update([1, 2]) == ("\u00e9", False)


@pytest.mark.parametrize("outputs, params, expected", [
    ([5, 2], types.SamplingParams(max_tokens=10), types.FinishReason.STOP),
    ([5, 2], types.SamplingParams(max_tokens=10, ignore_eos=True), None),
    ([5, 6], types.SamplingParams(max_tokens=2), types.FinishReason.LENGTH),
    ([5], types.SamplingParams(max_tokens=10), None),
])
def test_finish_reason(outputs, params, expected):
    assert output.finish_reason(outputs, 3, params, frozenset({2}), 100) is expected


def test_context_limit_finishes_with_length():
    p = types.SamplingParams(max_tokens=100)
    assert output.finish_reason([5, 6], 8, p, frozenset(), 10) is types.FinishReason.LENGTH


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v2", "mixtral"])
def test_incremental_detokenization_streams_exactly_the_whole_decode(tiny_models, family):
    """The windowed decode gives, delta by delta, the text of decoding the whole output (the
    reference), for text with multi-byte characters and for random ids (special and partial
    byte tokens among them), also when a request is resumed mid-output (adopted)."""
    import random

    from elasticmoe_worker.engine import engine as engine_mod

    tok = engine_mod.load_tokenizer(tiny_models[family])

    def streamed(ids, resume_at=None):
        d, out = output.Detokenizer(tok, ()), ""
        for i in range(1, len(ids) + 1):
            if i == resume_at:
                emitted, d = d.emitted, output.Detokenizer(tok, ())
                d.resume(ids[:i - 1], emitted)
            out += d.update(ids[:i])[0]
        return out + d.flush()

    rng = random.Random(0)
    cases = [tok.encode("Hello wörld, naïve café — 東京は晴れ 🌤️ ok. " * 3, add_special_tokens=False)]
    cases += [[rng.randrange(len(tok)) for _ in range(rng.randrange(3, 50))] for _ in range(100)]
    for ids in cases:
        whole = tok.decode(ids, skip_special_tokens=True)
        assert streamed(ids) == whole, ids
        assert streamed(ids, resume_at=rng.randrange(2, len(ids) + 1)) == whole, ids

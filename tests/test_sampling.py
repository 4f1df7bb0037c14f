"""Sampling rules on hand-built logits, settings validation, and streamed text handling."""

import math

import pytest
import torch
from tritonlm.engine.inference.sampling import (
    SamplingConfig,
    SamplingError,
    apply_frequency_presence,
    apply_repetition_penalty,
    make_generator,
    min_p_filter,
    parse_setting,
    process_logits,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from tritonlm.engine.inference.text_stream import TextStream, longest_stop_prefix_suffix


def kept(logits: torch.Tensor) -> list[int]:
    return torch.nonzero(torch.isfinite(logits[0])).flatten().tolist()


def log_probs(*p: float) -> torch.Tensor:
    return torch.tensor([p]).log()


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_top_k_keeps_exactly_k_largest(k):
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.5, 0.7, 1.9, -0.3]])
    out = top_k_filter(logits, k)
    expected = torch.topk(logits[0], k).indices.sort().values.tolist()
    assert kept(out) == expected
    assert len(kept(out)) == k
    # kept logits unchanged
    assert torch.equal(out[0, expected], logits[0, expected])


def test_top_k_exactly_k_even_with_ties_and_per_row():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0], [0.0, 5.0, 4.0, 3.0, 2.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).sum(dim=1).tolist() == [2, 2]
    assert torch.isfinite(out[1]).tolist() == [False, True, True, False, False]


def test_top_k_zero_or_large_is_off():
    logits = torch.randn(2, 6)
    assert torch.equal(top_k_filter(logits, 0), logits)
    assert torch.equal(top_k_filter(logits, 6), logits)
    assert torch.equal(top_k_filter(logits, 60), logits)


# ----------------------------------------------------------------------------- top-p


def test_top_p_keeps_smallest_set_reaching_p():
    logits = log_probs(0.05, 0.5, 0.15, 0.3)  # sorted: .5 (1), .3 (3), .15 (2), .05 (0)
    assert kept(top_p_filter(logits, 0.5)) == [1]
    assert kept(top_p_filter(logits, 0.8)) == [1, 3]  # .5 + .3 reaches .8 exactly
    assert kept(top_p_filter(logits, 0.81)) == [1, 2, 3]
    assert kept(top_p_filter(logits, 0.95)) == [1, 2, 3]
    assert kept(top_p_filter(logits, 0.96)) == [0, 1, 2, 3]
    assert kept(top_p_filter(logits, 0.01)) == [1]  # the best token is always kept
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_matches_brute_force_on_random_rows():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(1, 12, generator=g) * 2
        p = float(torch.rand(1, generator=g)) * 0.98 + 0.01
        probs = torch.softmax(logits[0].double(), 0).tolist()
        order = sorted(range(12), key=lambda i: -probs[i])
        total, want = 0.0, []
        for i in order:
            want.append(i)
            total += probs[i]
            if total >= p - 1e-6:
                break
        assert kept(top_p_filter(logits, p)) == sorted(want)


# ----------------------------------------------------------------------------- min-p


def test_min_p_drops_tokens_below_fraction_of_best():
    logits = log_probs(0.5, 0.2, 0.05, 0.25)
    # threshold .2 * .5 = .1: drops only .05
    assert kept(min_p_filter(logits, 0.2)) == [0, 1, 3]
    # threshold .45 * .5 = .225: keeps .5 and .25
    assert kept(min_p_filter(logits, 0.45)) == [0, 3]
    assert kept(min_p_filter(logits, 0.99)) == [0]
    assert torch.equal(min_p_filter(logits, 0.0), logits)


# ----------------------------------------------------------------------------- penalties


def test_repetition_penalty_changes_exactly_the_seen_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 4.0]])
    seen = torch.tensor([[True, True, False, False, True]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, -3.0, 2.0]]
    # below 1 rewards repeats the other way round
    out = apply_repetition_penalty(logits, seen, 0.5)
    assert out.tolist() == [[4.0, -0.5, 0.5, -3.0, 8.0]]
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.0), logits)


def test_frequency_and_presence_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_frequency_presence(logits, counts, frequency=0.5, presence=0.25)
    assert out.tolist() == [[1.0, 1.0 - 0.5 - 0.25, 1.0 - 1.5 - 0.25, 1.0]]
    out = apply_frequency_presence(logits, counts, frequency=-1.0, presence=0.0)
    assert out.tolist() == [[1.0, 2.0, 4.0, 1.0]]


def test_process_logits_order_and_greedy_ignores_filters():
    logits = torch.tensor([[3.0, 2.5, 0.0, -1.0]])
    seen = torch.tensor([[True, False, False, False]])
    counts = torch.zeros(1, 4)
    cfg = SamplingConfig(temperature=0, top_k=1, repetition_penalty=1.5)
    out = process_logits(logits, cfg, seen, counts)
    assert out.tolist() == [[2.0, 2.5, 0.0, -1.0]]  # penalties only
    assert sample_next(logits, cfg, None, seen, counts).tolist() == [1]


def test_temperature_scales_logits():
    logits = torch.tensor([[2.0, 1.0, -4.0]])
    cfg = SamplingConfig(temperature=2.0, top_p=1.0)
    assert process_logits(logits, cfg).tolist() == [[1.0, 0.5, -2.0]]
    cfg = SamplingConfig(temperature=0.5, top_p=1.0)
    assert process_logits(logits, cfg).tolist() == [[4.0, 2.0, -8.0]]


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 0.2, 5.0, 0.3], [9.0, 0.0, 0.0, 0.0]])
    cfg = SamplingConfig(temperature=0)
    assert sample_next(logits, cfg).tolist() == [2, 0]


def test_sampling_frequencies_follow_softmax_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = make_generator(0)
    ids = sample_next(logits, SamplingConfig(temperature=1.0, top_p=1.0), gen)
    freq = torch.bincount(ids, minlength=4).double() / len(ids)
    want = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]).double(), 0)
    assert torch.allclose(freq, want, atol=0.03)
    ids = sample_next(logits, SamplingConfig(temperature=1.0, top_k=2, top_p=1.0), gen)
    assert set(ids.tolist()) == {0, 1}
    ids = sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), gen)
    assert set(ids.tolist()) == {0}


def test_seeded_sampling_reproducible():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    cfg = SamplingConfig(temperature=1.5, top_p=1.0)
    draws = [
        torch.stack([sample_next(logits, cfg, g) for _ in range(20)])
        for g in (make_generator(7), make_generator(7), make_generator(8))
    ]
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": 1.0}, "min_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"frequency_penalty": math.inf}, "frequency_penalty"),
        ({"presence_penalty": None}, "presence_penalty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": True}, "max_new_tokens"),
        ({"seed": -3}, "seed"),
        ({"stop": ("ok", "")}, "stop"),
        ({"stop": (1,)}, "stop"),
    ],
)
def test_validation_names_the_setting(kwargs, words):
    with pytest.raises(SamplingError, match=words):
        SamplingConfig(**kwargs)


def test_valid_edges_accepted_and_replace_validates():
    cfg = SamplingConfig(temperature=0, top_k=0, top_p=1.0, min_p=0.0, seed=0, stop="x")
    assert cfg.greedy and cfg.stop == ("x",)
    with pytest.raises(SamplingError, match="top_p"):
        cfg.replace(top_p=2.0)


def test_dict_roundtrip_and_unknown_keys():
    cfg = SamplingConfig(temperature=0.5, top_k=7, seed=3, stop=("User:", "###"))
    d = cfg.to_dict()
    assert d["stop"] == ["User:", "###"]  # JSON-ready: tuples become lists
    assert SamplingConfig.from_dict(d) == cfg
    with pytest.raises(SamplingError, match="unknown sampling config key.*warmth"):
        SamplingConfig.from_dict({"warmth": 1})


def test_parse_setting():
    cfg = SamplingConfig()
    assert parse_setting(cfg, "temperature", "0.5").temperature == 0.5
    assert parse_setting(cfg, "top-k", "40").top_k == 40
    assert parse_setting(cfg, "seed", "none").seed is None
    cfg2 = parse_setting(parse_setting(cfg, "stop", "User:"), "stop", "###")
    assert cfg2.stop == ("User:", "###")
    assert parse_setting(cfg2, "stop", "none").stop == ()
    with pytest.raises(SamplingError, match="unknown setting"):
        parse_setting(cfg, "warmth", "1")
    with pytest.raises(SamplingError, match="cannot parse"):
        parse_setting(cfg, "top_k", "many")
    with pytest.raises(SamplingError, match="temperature"):
        parse_setting(cfg, "temperature", "-1")


# ----------------------------------------------------------------------------- text stream


def feed(ts: TextStream, chunks: list[bytes]) -> list[str]:
    return [ts.push(c) for c in chunks]


def test_multibyte_character_split_across_tokens():
    data = "aé€😀".encode()
    ts = TextStream()
    pieces = feed(ts, [bytes([b]) for b in data])
    assert "".join(pieces) == "aé€😀"
    assert "\ufffd" not in "".join(pieces)
    assert pieces[:3] == ["a", "", "é"]  # é is 2 bytes: nothing until it is complete


def test_invalid_utf8_becomes_replacement_char():
    ts = TextStream()
    out = ts.push(b"a\xff") + ts.push(b"\xc3") + ts.flush()
    assert out == "a\ufffd\ufffd"


def test_stop_string_never_released_even_split():
    text = "say hello END and more"
    for size in (1, 2, 3, 5):
        ts = TextStream(stop=("END",))
        chunks = [text[i : i + size].encode() for i in range(0, len(text), size)]
        pieces = feed(ts, chunks) + [ts.flush()]
        assert "".join(pieces) == "say hello "
        assert ts.stopped and ts.text == "say hello "
        released = ""
        for p in pieces:
            released += p
            assert "E" not in released


def test_held_prefix_released_when_not_a_stop():
    ts = TextStream(stop=("User:",))
    assert ts.push(b"Hi Us") == "Hi "
    assert ts.push(b"ual") == "Usual"
    assert ts.push(b" Use") == " "
    assert ts.flush() == "Use"  # end of generation: held text was not a stop string
    assert ts.text == "Hi Usual Use" and not ts.stopped


def test_overlapping_stop_prefixes_and_earliest_stop_wins():
    ts = TextStream(stop=("aab", "bc"))
    out = "".join(feed(ts, [b"a", b"a", b"a", b"b", b"c"]))
    assert out == "a" and ts.stopped
    ts = TextStream(stop=("xyz", "y"))
    assert "".join(feed(ts, [b"x", b"y"])) == "x"


def testlongest_stop_prefix_suffix():
    assert longest_stop_prefix_suffix("Hello Us", ["User:"]) == 2
    assert longest_stop_prefix_suffix("Hello", ["User:"]) == 0
    assert longest_stop_prefix_suffix("aa", ["aab"]) == 2
    assert longest_stop_prefix_suffix("xx", ["x", "xy"]) == 1

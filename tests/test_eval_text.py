"""llm-eval on text: loss and bits per byte equal a brute-force sum, windows cover every
token once, and a document that fits scores the same with any stride."""

import math

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.eval.text import count_windows, document_windows, evaluate_texts

DOCS = [
    "the cat sat on the mat.",
    "a dog ran far away, then came back — ünïcode ✓ too.",
    "short",
]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer(DOCS * 3, vocab_size=290)
    return tiny_model(tok, seed=1, backend="torch", d_ff=64, max_seq_len=64), tok


def _token_nlls(model, ids: list[int]) -> list[float]:
    """-log p(ids[t] | ids[:t]) for t = 1.. from ONE full forward, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0].double()
    logp = torch.log_softmax(logits, -1)
    return [-float(logp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_bits_per_byte_equals_brute_force(lm):
    model, tok = lm
    score = evaluate_texts(model, tok, DOCS, batch_size=2)  # rows of unequal length padded
    nll, tokens = 0.0, 0
    for text in DOCS:
        ids = [tok.bos_id, *tok.encode(text)]
        nll += sum(_token_nlls(model, ids))
        tokens += len(ids) - 1
    n_bytes = sum(len(t.encode("utf-8")) for t in DOCS)
    assert (score.documents, score.tokens, score.bytes) == (3, tokens, n_bytes)
    assert score.nll == pytest.approx(nll, rel=1e-5)
    assert score.loss == pytest.approx(nll / tokens, rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert score.bits_per_byte == pytest.approx(nll / math.log(2) / n_bytes, rel=1e-5)
    assert n_bytes > sum(len(t) for t in DOCS)  # bytes, not characters, are counted


@pytest.mark.parametrize("stride", [1, 5, 32, 64])
def test_stride_does_not_matter_when_the_document_fits(lm, stride):
    model, tok = lm
    full = evaluate_texts(model, tok, DOCS, context=64, stride=64)
    windowed = evaluate_texts(model, tok, DOCS, context=64, stride=stride, batch_size=3)
    assert windowed.tokens == full.tokens
    assert windowed.nll == pytest.approx(full.nll, rel=1e-5)


def test_stride_one_scores_each_token_with_a_full_window(lm):
    """A document longer than the window: with stride 1 every token t is scored given
    exactly the `context` tokens before it (or all of them near the start)."""
    model, tok = lm
    text = " ".join(DOCS * 3)
    ids = [tok.bos_id, *tok.encode(text)]
    context = 8
    assert len(ids) > 3 * context
    expected = 0.0
    for t in range(1, len(ids)):
        window = ids[max(0, t - context) : t + 1]
        expected += _token_nlls(model, window)[-1]
    score = evaluate_texts(model, tok, [text], context=context, stride=1, batch_size=16)
    assert score.tokens == len(ids) - 1
    assert score.nll == pytest.approx(expected, rel=1e-5)


def test_long_document_scores_differ_from_a_truncated_context(lm):
    """Windows matter: disjoint windows (less context) give a different total than
    stride 1 on a long document, while covering the same tokens."""
    model, tok = lm
    text = " ".join(DOCS * 3)
    a = evaluate_texts(model, tok, [text], context=8, stride=8)
    b = evaluate_texts(model, tok, [text], context=8, stride=1)
    assert a.tokens == b.tokens
    assert a.nll != pytest.approx(b.nll, rel=1e-6)


@pytest.mark.parametrize("n,context,stride", [(1, 4, 1), (5, 4, 2), (9, 4, 4), (10, 3, 1),
                                              (4, 4, 3), (17, 6, 5)])  # fmt: skip
def test_windows_score_every_token_exactly_once(n, context, stride):
    ids = list(range(100, 101 + n))  # <bos> and n targets
    rows = document_windows(ids, context, stride)
    assert len(rows) == count_windows(n, context, stride)
    scored = []
    for row, k in rows:
        assert 2 <= len(row) <= context + 1  # at most `context` inputs
        scored += row[len(row) - k :]
        # every scored token but the first window's sees >= context - stride tokens
        if row[0] != ids[0]:
            assert len(row) - k >= context - stride + 1
    assert scored == ids[1:]


def test_bad_window_settings_are_refused(lm):
    model, tok = lm
    with pytest.raises(ValueError, match="stride"):
        evaluate_texts(model, tok, DOCS, context=8, stride=9)
    with pytest.raises(ValueError, match="max_seq_len"):
        evaluate_texts(model, tok, DOCS, context=65)

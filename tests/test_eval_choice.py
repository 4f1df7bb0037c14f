"""llm-eval multiple choice: scores equal one full forward per choice, acc / acc_norm and
their standard errors follow lm-evaluation-harness's definitions, few-shot is seeded."""

import math

import numpy as np
import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.eval.choice import evaluate_choices, fewshot_contexts, request_ids
from tritonlm.engine.eval.task_formats import Item

ITEMS = [
    Item("The cat sat on the", ("mat.", "moon, far away from home.", "dog"), 0, line=1),
    Item("A dog ran", ("far away.", "up", "into the house and slept"), 2, line=2),
    Item("Question: what is red?\nAnswer:", ("a rose", "the sky"), 1, line=3),
    Item("ünïcode ✓ ", ("yes", "no way"), 0, line=4),  # trailing space moves to the choice
    Item("Once upon a time", ("there was a king.", "x", "the end"), 1, line=5),
]


@pytest.fixture(scope="module")
def lm():
    texts = [it.context + " " + c for it in ITEMS for c in it.choices]
    tok = tiny_tokenizer(texts * 2, vocab_size=300)
    return tiny_model(tok, seed=2, backend="torch", d_ff=64, max_seq_len=96), tok


def _brute_loglik(model, tok, context: str, choice: str) -> float:
    """log p(" " + choice | <bos> context) from one unpadded forward of the whole row."""
    cont = " " + choice
    if context != context.rstrip():  # the harness moves the context's trailing spaces
        cont = context[len(context.rstrip()) :] + cont
        context = context.rstrip()
    n_ctx = len(tok.encode(context))
    whole = [tok.bos_id, *tok.encode(context + cont)]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole[:-1]]))[0].double(), -1)
    return sum(float(logp[t - 1, whole[t]]) for t in range(1 + n_ctx, len(whole)))


@pytest.mark.parametrize("batch_size", [1, 4])
def test_scores_equal_one_forward_per_choice(lm, batch_size):
    model, tok = lm
    res = evaluate_choices(model, tok, ITEMS, batch_size=batch_size)
    acc, norm = [], []
    for item, d in zip(ITEMS, res.details, strict=True):
        lls = np.array([_brute_loglik(model, tok, item.context, c) for c in item.choices])
        assert d["loglikelihoods"] == pytest.approx(lls.tolist(), rel=1e-5, abs=1e-5)
        lengths = np.array([float(len(c)) for c in item.choices])
        acc.append(float(np.argmax(lls) == item.gold))
        norm.append(float(np.argmax(lls / lengths) == item.gold))
    assert res.items == len(ITEMS)
    assert res.acc == pytest.approx(np.mean(acc))
    assert res.acc_norm == pytest.approx(np.mean(norm))
    assert res.acc_stderr == pytest.approx(np.std(acc, ddof=1) / math.sqrt(len(acc)))
    assert res.acc_norm_stderr == pytest.approx(np.std(norm, ddof=1) / math.sqrt(len(norm)))


def test_acc_norm_divides_by_characters_not_tokens(lm):
    """A choice whose per-character log-likelihood is best wins acc_norm even when its
    total is worse: checked on the model's own scores."""
    model, tok = lm
    res = evaluate_choices(model, tok, ITEMS)
    for item, d in zip(ITEMS, res.details, strict=True):
        per_char = [ll / len(c) for ll, c in zip(d["loglikelihoods"], item.choices, strict=True)]
        assert d["pred_norm"] == int(np.argmax(per_char))
        assert d["pred"] == int(np.argmax(d["loglikelihoods"]))


def test_continuation_tokens_follow_the_harness_split(lm):
    model, tok = lm
    ids, n = request_ids(tok, "The cat sat on the", " mat.", 96)
    assert ids[0] == tok.bos_id
    assert ids[1:] == tok.encode("The cat sat on the mat.")
    whole, ctx = tok.encode("The cat sat on the mat."), tok.encode("The cat sat on the")
    assert ids[-n:] == whole[len(ctx) :]
    # a long context is cut from the left; the continuation stays whole
    long_ids, long_n = request_ids(tok, " ".join(["word"] * 200), " mat.", 96)
    short_ids, short_n = request_ids(tok, "word word", " mat.", 96)
    assert len(long_ids) == 97 and long_n == short_n and long_ids[-4:] == short_ids[-4:]


def test_fewshot_is_seeded_and_never_shows_the_item_itself(lm):
    a = fewshot_contexts(ITEMS, 2, seed=7)
    assert a == fewshot_contexts(ITEMS, 2, seed=7)
    assert a != fewshot_contexts(ITEMS, 2, seed=8)
    for i, ctx in enumerate(a):
        shots = ctx.split("\n\n")
        assert len(shots) == 3 and shots[-1] == ITEMS[i].context
        solved = {it.context + " " + it.choices[it.gold] for it in ITEMS}
        for shot in shots[:2]:
            assert (
                shot in solved and shot != ITEMS[i].context + " " + ITEMS[i].choices[ITEMS[i].gold]
            )
    # an item's examples do not depend on how many items are scored
    model, tok = lm
    full = evaluate_choices(model, tok, ITEMS, fewshot=2, seed=7)
    first = evaluate_choices(model, tok, ITEMS, fewshot=2, seed=7, limit=2)
    assert first.items == 2
    assert first.details == full.details[:2]
    with pytest.raises(ValueError, match="fewshot"):
        fewshot_contexts(ITEMS, len(ITEMS), seed=0)


def test_one_item_has_no_standard_error(lm):
    model, tok = lm
    res = evaluate_choices(model, tok, ITEMS, limit=1)
    assert res.items == 1 and res.acc_stderr is None and res.acc_norm_stderr is None

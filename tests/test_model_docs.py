"""Packed rows through the public model API: with `document_ids`, each document of a row
gets the logits (and the loss) it gets when run alone, on the torch reference and on our
Triton kernels (interpreter); RoPE positions restart at 0 in every document."""

from __future__ import annotations

import pytest
import torch
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.transformer import Transformer

# head dim 32 (d_model 64, 2 heads; 1 kv head: grouped-query attention): a kernel head dim
CFG = dict(vocab_size=61, d_model=64, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=96,
           max_seq_len=40)  # fmt: skip
DOCS = (7, 1, 19, 13)  # document lengths of the packed row (40 tokens)


def _model(backend: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**CFG), backend=backend).eval()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_documents_in_a_packed_row_equal_each_alone(backend):
    m = _model(backend)
    g = torch.Generator().manual_seed(1)
    row = torch.randint(0, 61, (1, sum(DOCS)), generator=g)
    ids = torch.repeat_interleave(torch.arange(len(DOCS)), torch.tensor(DOCS))[None]
    with torch.no_grad():
        packed = m(row, document_ids=ids)
        plain = m(row)
        start = 0
        for n in DOCS:
            alone = m(row[:, start : start + n])
            torch.testing.assert_close(packed[:, start : start + n], alone, atol=2e-5, rtol=1e-5)
            start += n
    # Without ids the later documents see the earlier ones: the ids were not ignored.
    assert not torch.allclose(packed[:, DOCS[0] :], plain[:, DOCS[0] :], atol=1e-3)


def test_packed_loss_and_gradients_agree_across_backends():
    """Loss and every parameter gradient of a packed batch (with right padding on top) on
    the kernels equal the torch reference's."""
    g = torch.Generator().manual_seed(2)
    idx = torch.randint(0, 61, (2, 40), generator=g)
    targets = torch.randint(0, 61, (2, 40), generator=g)
    ids = torch.tensor([[0] * 9 + [1] * 30 + [2], [0] * 40])
    lengths = torch.tensor([40, 33])
    results = {}
    for backend in ("torch", "triton"):
        m = _model(backend)
        loss = m.loss(idx, targets, lengths=lengths, document_ids=ids)
        loss.backward()
        results[backend] = (loss.detach(), {n: p.grad for n, p in m.named_parameters()})
    (l0, g0), (l1, g1) = results["torch"], results["triton"]
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-5)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5, msg=name)


def test_document_ids_must_match_idx():
    m = _model("torch")
    with pytest.raises(ValueError, match="document_ids shape"):
        m(torch.zeros(1, 5, dtype=torch.long), document_ids=torch.zeros(1, 4, dtype=torch.long))

"""Inference weights on the CPU: column-major matrices change strides only, never results
(issue 22: a one-row decode step streams the weights faster in that layout)."""

import pytest
import torch
from factories import tiny_model, tiny_tokenizer
from tritonlm.engine.errors import SettingError
from tritonlm.engine.inference.generate import generate, generate_batch
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model.inference_weights import column_major, prepare_inference_weights
from tritonlm.engine.model.int8 import Int8Linear

SHAPE = dict(d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=80, max_seq_len=40)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(vocab_size=300)


@pytest.mark.parametrize("tie", [True, False])
def test_column_major_keeps_values_parameters_and_ties(tok, tie):
    model = tiny_model(tok, SHAPE, seed=3, tie_embeddings=tie)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    params = {k: id(p) for k, p in model.named_parameters()}
    idx = torch.randint(0, tok.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(idx)[0].double()
    n = column_major(model)
    # one per matrix: qkv, proj, gate_up, down per block, the embedding (+ an untied head)
    assert n == 4 * SHAPE["n_layers"] + (1 if tie else 2)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # the same values...
        if v.dim() == 2 and not k.startswith("rope"):
            assert v.stride() == (1, v.shape[0]), k  # ...stored column-major
    assert {k: id(p) for k, p in model.named_parameters()} == params
    assert (model.output_weight is model.tok_emb.weight) == tie
    with torch.no_grad():
        out = model(idx)[0].double()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_greedy_decoding_is_unchanged(tok):
    """generate and batched generate (left padding) give the tokens of row-major weights."""
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=12)
    prompts = [tok.encode("the cat sat"), tok.encode("checkpoints are")]
    model = tiny_model(tok, SHAPE, seed=5)
    ref = [generate(model, tok, p, cfg).token_ids for p in prompts]
    ref_batch = [r.token_ids for r in generate_batch(model, tok, prompts, cfg)]
    prepare_inference_weights(model)
    assert [generate(model, tok, p, cfg).token_ids for p in prompts] == ref
    assert [r.token_ids for r in generate_batch(model, tok, prompts, cfg)] == ref_batch


def test_int8_matrices_are_laid_out_too(tok):
    model = tiny_model(tok, SHAPE, seed=7)
    plain = tiny_model(tok, SHAPE, seed=7)
    prepare_inference_weights(model, "int8")
    prepare_inference_weights(plain, "int8")
    for mod in plain.modules():  # the reference: int8, back to row-major
        if isinstance(mod, Int8Linear):
            mod.q = mod.q.contiguous()
    qs = [m.q for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(qs) == 4 * SHAPE["n_layers"] + 1  # the blocks and the output projection
    assert all(q.stride() == (1, q.shape[0]) for q in qs)
    idx = torch.randint(0, tok.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], plain(idx)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_a_compiled_step_keeps_every_matrix_row_major(tok, weights):
    """The compiled step's fused products read one weight row per output (row_products):
    nothing is re-laid out, int8 or float, and a compiled int8 step has an int8 head."""
    model = prepare_inference_weights(tiny_model(tok, SHAPE), weights, compiled=True)
    mats = [p for p in model.parameters() if p.dim() == 2]
    mats += [m.q for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(mats) >= 5 and all(t.is_contiguous() for t in mats)
    assert (model.int8_head is not None) == (weights == "int8")


def test_unknown_weight_format_is_a_setting_error(tok):
    with pytest.raises(SettingError, match="weights must be one of"):
        prepare_inference_weights(tiny_model(tok, SHAPE), "int4")

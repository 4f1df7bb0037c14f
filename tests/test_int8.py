"""Weight-only int8: the rounding error bound, a quantized model close to its float self,
and --weights int8 through llm-chat and llm-eval (whose perplexity stays close)."""

import json

import pytest
import torch
from chat_fixtures import CHATS, trained_checkpoint
from tritonlm.cli import chat, evaluate
from tritonlm.engine.inference.generate import generate
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.decode_step import DecodeStep
from tritonlm.engine.model.int8 import Int8Linear, quantize_int8
from tritonlm.engine.model.row_products import FUSED_ROWS
from tritonlm.engine.model.transformer import Transformer


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


def test_int8_linear_rounding_bound():
    torch.manual_seed(0)
    w = torch.randn(37, 53) * torch.rand(37, 1) * 3  # rows of different ranges
    layer = Int8Linear(w)
    assert layer.q.dtype == torch.int8 and int(layer.q.abs().max()) <= 127
    scale = w.abs().amax(1) / 127
    assert bool(((layer.dequantized() - w).abs() <= scale[:, None] / 2 + 1e-6).all())
    x = torch.randn(5, 53)
    torch.testing.assert_close(layer(x), x @ layer.dequantized().T, atol=1e-4, rtol=1e-4)


def test_quantized_model_stays_close_and_decodes():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, max_seq_len=32)  # fmt: skip
    model = Transformer(cfg, backend="torch").eval()
    idx = torch.tensor([[5, 9, 200, 31, 7, 64]])
    with torch.no_grad():
        want = model(idx)
        assert quantize_int8(model) == 4 * cfg.n_layers
        got = model(idx)
    assert float((got - want).abs().max()) < 0.05 * float(want.abs().max())
    assert all(isinstance(b.ffn.down, Int8Linear) for b in model.blocks)
    r = generate(model, None, [5, 9, 200], SamplingConfig(temperature=0, max_new_tokens=8),
                 stop_token_ids=[])  # fmt: skip
    assert r.new_tokens == 8  # the fixed-shape decode step runs the int8 matrices too


def test_chat_with_int8_weights_answers(ckpt, capsys, restore_threads):
    user, want = CHATS[0]
    assert chat.main([str(ckpt), "--prompt", user, "--temperature", "0", "--weights", "int8"]) == 0
    assert capsys.readouterr().out == want + "\n"


def test_eval_perplexity_cost_of_int8_is_small(ckpt, tmp_path, capsys, restore_threads):
    data = tmp_path / "held_out.txt"
    data.write_text(" ".join(f"{u} {a}" for u, a in CHATS) * 3)
    scores = {}
    for weights in ("fp32", "int8"):
        argv = [str(ckpt), "--data", str(data), "--json", "--quiet", "--weights", weights]
        assert evaluate.main(argv) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["weights"] == weights
        scores[weights] = out["text"]["bits_per_byte"]
    assert scores["int8"] == pytest.approx(scores["fp32"], rel=0.05)
    assert scores["int8"] != scores["fp32"]  # the int8 matrices were really used


@pytest.mark.parametrize("weights", ["fp32", "int8"])
def test_the_chat_and_server_loader_lays_weights_out_column_major(ckpt, weights):
    """llm-chat and llm-serve load through chat_session.load: on the CPU every matrix comes
    back column-major (engine.model.inference_weights), int8 or not."""
    from tritonlm.cli.chat_session import load

    model = load(str(ckpt), torch.device("cpu"), "torch", weights).model
    mats = [p for p in model.parameters() if p.dim() == 2]
    mats += [m.q for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(mats) >= 5 and all(t.stride() == (1, t.shape[0]) for t in mats)


@pytest.mark.parametrize("rows", [1, 3, FUSED_ROWS + 1])
def test_compiled_int8_product_equals_eager(rows):
    """Under torch.compile a product of up to FUSED_ROWS rows is a multiply-and-sum over
    the int8 weights (no float copy of the matrix); wider ones stay a matrix product.
    Both give the eager layer's output."""
    torch.manual_seed(rows)
    layer = Int8Linear(torch.randn(29, 45))
    x = torch.randn(rows, 45)
    got = torch.compile(layer, backend="eager", fullgraph=True)(x)
    torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, x @ layer.dequantized().T, atol=1e-4, rtol=1e-4)


def test_compiled_int8_decode_gives_the_eager_tokens():
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=128, max_seq_len=32)  # fmt: skip
    model = Transformer(cfg, backend="torch").eval()
    quantize_int8(model)
    sampling = SamplingConfig(temperature=0, max_new_tokens=10)
    want = generate(model, None, [5, 9, 200], sampling, stop_token_ids=[])
    decoder = DecodeStep(model, model.new_cache(1, max_len=16), "compile", "eager")
    got = generate(model, None, [5, 9, 200], sampling, stop_token_ids=[], decoder=decoder)
    assert got.token_ids == want.token_ids and got.new_tokens == 10


def test_int8_head_projects_onto_the_vocabulary():
    """quantize_int8(head=True) adds an int8 copy of the (tied) output projection, which
    model.project and so forward use; the embedding stays float; without it, the float
    projection."""
    torch.manual_seed(2)
    cfg = ModelConfig(vocab_size=300, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                      max_seq_len=32)  # fmt: skip
    model = Transformer(cfg, backend="torch").eval()
    idx = torch.tensor([[5, 9, 200, 31]])
    with torch.no_grad():
        float_logits = model(idx)
        assert model.int8_head is None
        assert quantize_int8(model, head=True) == 4 * cfg.n_layers + 1
        hidden = model.hidden_states(idx)
        got = model(idx)
    assert model.tok_emb.weight.dtype == torch.float32  # the lookup side stays float
    head = model.int8_head.dequantized()
    torch.testing.assert_close(got, hidden @ head.T, atol=1e-4, rtol=1e-4)
    assert not torch.equal(head, model.output_weight)  # really the rounded matrix
    assert float((got - float_logits).abs().max()) < 0.05 * float(float_logits.abs().max())


@pytest.mark.parametrize("compiled", [False, True])
def test_int8_loader_gives_an_int8_head(ckpt, compiled):
    """llm-chat/llm-serve/llm-eval --weights int8 project onto the vocabulary in int8 too,
    compiled or not (one set of weights scored and decoded); row-major for the compiled
    step's fused product, column-major for the eager one's matrix product."""
    from tritonlm.cli.chat_session import load

    model = load(str(ckpt), torch.device("cpu"), "torch", "int8", compiled=compiled).model
    q = model.int8_head.q
    assert q.is_contiguous() == compiled and q.shape == model.output_weight.shape
    assert load(str(ckpt), torch.device("cpu"), "torch", "fp32").model.int8_head is None

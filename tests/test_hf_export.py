"""llm-export to the Hugging Face Llama layout, proven by its real consumer, transformers.

The trained tiny checkpoint of chat_fixtures.py ("hi" -> "hello there, friend.") and a
random grouped-query model are exported; transformers must load each folder and give our
logits (1e-4, fp32), our greedy tokens, our token ids and our chat prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # test dependency: the consumer the export is written for
from chat_fixtures import trained_checkpoint
from factories import run_cli, tiny_model
from safetensors import safe_open
from tritonlm.cli import export as export_cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.inference.decode_row import default_stop_ids
from tritonlm.engine.inference.generate import generate
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.model.transformer import Transformer

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

HELD_OUT = "hello friend, what is a piece? ünïcode ✓ 12345\n\tbye!"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def loaded(ckpt):
    return load_checkpoint(ckpt, backend="torch")


@pytest.fixture(scope="module")
def exported(loaded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hf") / "out"
    assert export_cli.main([str(loaded.path), str(out)]) == 0
    return out


def hf_model(path, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kw).eval()


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------- fp32 parity


def test_transformers_gives_our_logits_and_greedy_tokens(loaded, exported):
    tok, ours = loaded.tokenizer, loaded.model
    theirs = hf_model(exported)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    prompt, _ = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    raw = [tok.bos_id, *tok.encode("what is a")]
    with torch.no_grad():
        for ids in (prompt, raw):
            x = torch.tensor([ids])
            assert max_diff(theirs(x).logits, ours(x)) < 1e-4
    # a chat answer: both stop at the end of the turn (every control token is an eos id)
    mine = generate(ours, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=32))
    assert mine.text == "hello there, friend." and mine.stop_reason == "end"
    out = theirs.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=32)
    assert out[0, len(prompt) :].tolist() == mine.token_ids
    # 32 tokens without any stop token, on both sides
    mine = generate(ours, None, raw, SamplingConfig(temperature=0, max_new_tokens=32),
                    stop_token_ids=[])  # fmt: skip
    assert len(mine.token_ids) == 32
    out = theirs.generate(torch.tensor([raw]), do_sample=False, max_new_tokens=32,
                          eos_token_id=None, min_new_tokens=32)  # fmt: skip
    assert out[0, len(raw) :].tolist() == mine.token_ids


def test_folder_contents_config_and_tokenizer(loaded, exported):
    tok = loaded.tokenizer
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == 2
    assert cfg["torch_dtype"] == "float32" and cfg["max_position_embeddings"] == 64
    gen = json.loads((exported / "generation_config.json").read_text())
    stops = default_stop_ids(tok, None)  # what ends an answer in our generator
    assert set(gen["eos_token_id"]) == set(stops) and {tok.eos_id, tok.end_id} <= set(stops)
    assert gen["eos_token_id"] == cfg["eos_token_id"] and gen["pad_token_id"] == tok.pad_id
    assert "lm_head.weight" not in safe_open(str(exported / "model.safetensors"), "pt").keys()
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    assert hf_tok.encode(HELD_OUT, add_special_tokens=False) == tok.encode(HELD_OUT)
    messages = [{"role": "user", "content": "what is a token?"}]
    want, _ = tok.render_chat(messages, add_generation_prompt=True)
    got = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    got = got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got
    assert list(got) == want


def test_grouped_query_untied_model(loaded, tmp_path):
    tok = loaded.tokenizer
    model = tiny_model(tok, seed=3, backend="torch", d_model=64, n_heads=4, n_kv_heads=2,
                       d_ff=80, max_seq_len=32, tie_embeddings=False, rope_theta=5000.0,
                       norm_eps=1e-5)  # fmt: skip
    for p in model.parameters():  # norms away from 1, so a misplaced norm shows
        if p.dim() == 1:
            p.data.uniform_(0.5, 1.5)
    save_checkpoint(tmp_path / "ckpt", model, tok)
    assert export_cli.main([str(tmp_path / "ckpt"), str(tmp_path / "hf")]) == 0
    theirs = hf_model(tmp_path / "hf")
    assert theirs.config.num_key_value_heads == 2 and not theirs.config.tie_word_embeddings
    x = torch.randint(0, tok.vocab_size, (2, 20))
    with torch.no_grad():
        assert max_diff(theirs(x).logits, model(x)) < 1e-4


# ----------------------------------------------------------------------------- shards, dtypes


def test_sharded_export_loads_in_transformers(loaded, exported, tmp_path, capsys):
    out = tmp_path / "sharded"
    rc, stdout, err = run_cli(export_cli.main, capsys, loaded.path, out, "--max-shard-size", "20KB")
    assert rc == 0 and err == "" and "weight files" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    for shard in shards:  # a tensor over the limit gets a shard of its own
        members = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(members) == 1 or (out / shard).stat().st_size < 20_000 + 4096  # + header
    x = torch.tensor([[loaded.tokenizer.bos_id, *loaded.tokenizer.encode("bye")]])
    with torch.no_grad():
        assert torch.equal(hf_model(out)(x).logits, hf_model(exported)(x).logits)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_exports(loaded, tmp_path, capsys, dtype, torch_dtype):
    out = tmp_path / dtype
    rc, _, err = run_cli(export_cli.main, capsys, loaded.path, out, "--dtype", dtype)
    assert rc == 0 and err == ""
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == str(torch_dtype)[6:]
    ours = loaded.model.state_dict()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        emb = f.get_tensor("model.embed_tokens.weight")
        assert emb.dtype == torch_dtype and torch.equal(emb, ours["tok_emb.weight"].to(torch_dtype))
    # our model with the rounded weights computes what transformers computes from the file
    rounded = Transformer(loaded.model.config, backend="torch").eval()
    rounded.load_state_dict({k: v.to(torch_dtype).float() for k, v in ours.items()})
    theirs = hf_model(out, dtype=torch.float32)
    x = torch.tensor([[loaded.tokenizer.bos_id, *loaded.tokenizer.encode("what is a token?")]])
    with torch.no_grad():
        assert max_diff(theirs(x).logits, rounded(x)) < 1e-4


# ----------------------------------------------------------------------------- safety, errors


def test_existing_folders_replaced_only_when_they_are_ours(loaded, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(export_cli.main, capsys, loaded.path, out, "--max-shard-size", "30KB")[0] == 0
    assert (out / "model.safetensors.index.json").exists()
    assert (
        run_cli(export_cli.main, capsys, loaded.path, out)[0] == 0
    )  # an earlier export: replaced whole
    assert (out / "model.safetensors").exists()
    assert not (out / "model.safetensors.index.json").exists()
    assert not list(tmp_path.glob(".out.*"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    rc, _, err = run_cli(export_cli.main, capsys, loaded.path, foreign)
    assert rc == 2 and err.count("\n") == 1 and "not empty" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_failed_export_leaves_the_previous_one(loaded, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert run_cli(export_cli.main, capsys, loaded.path, out)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    import tritonlm.engine.interop.hf_export as hf_export

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hf_export, "write_shards", disk_full)
    rc, _, err = run_cli(export_cli.main, capsys, loaded.path, out, "--dtype", "bf16")
    assert rc == 2 and "no space left on device" in err and err.count("\n") == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dtype", "int4"], "dtype 'int4' is not available for hf"),
        (["--dtype", "q8_0"], "not available for hf"),
        (["--max-shard-size", "lots"], "--max-shard-size"),
        (["--max-shard-size", "0"], "--max-shard-size"),
        (["--format", "onnx"], "invalid choice"),
    ],
)
def test_bad_arguments_are_one_line(loaded, tmp_path, capsys, argv, message):
    rc, out, err = run_cli(export_cli.main, capsys, loaded.path, tmp_path / "out", *argv)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err
    assert err.startswith("llm-export: error: ") and not (tmp_path / "out").exists()


def test_missing_checkpoint_is_one_line(tmp_path, capsys):
    rc, _, err = run_cli(export_cli.main, capsys, tmp_path / "nope", tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    rc, _, err = run_cli(
        export_cli.main, capsys, tmp_path / "nope", tmp_path / "x.gguf", "--max-shard-size", "1GB"
    )
    assert rc == 2 and "--format hf only" in err


def test_gguf_is_chosen_by_the_file_name_or_format(loaded, tmp_path, capsys):
    rc, out, err = run_cli(
        export_cli.main, capsys, loaded.path, tmp_path / "m.gguf", "--dtype", "fp16"
    )
    assert rc == 0 and err == "" and "(gguf, f16)" in out  # fp16 is gguf's f16
    assert (tmp_path / "m.gguf").read_bytes()[:4] == b"GGUF"
    rc, out, _ = run_cli(
        export_cli.main, capsys, loaded.path, tmp_path / "plain", "--format", "gguf"
    )
    assert rc == 0 and (tmp_path / "plain").read_bytes()[:4] == b"GGUF"
    rc, out, _ = run_cli(export_cli.main, capsys, loaded.path, tmp_path / "hf", "--dtype", "f16")
    assert rc == 0 and "Hugging Face LlamaForCausalLM, fp16" in out


def test_fp16_refuses_weights_beyond_its_range(loaded, tmp_path, capsys):
    model = Transformer(loaded.model.config, backend="torch")
    model.load_state_dict(loaded.model.state_dict())
    with torch.no_grad():
        model.blocks[1].ffn.down.weight[3, 5] = 7e4  # > 65504, the largest float16
    save_checkpoint(tmp_path / "ckpt", model, loaded.tokenizer)
    rc, _, err = run_cli(
        export_cli.main, capsys, tmp_path / "ckpt", tmp_path / "out", "--dtype", "fp16"
    )
    assert rc == 2 and err.count("\n") == 1 and not (tmp_path / "out").exists()
    assert "blocks.1.ffn.down.weight has values beyond float16's range" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary left
    assert (
        run_cli(export_cli.main, capsys, tmp_path / "ckpt", tmp_path / "out", "--dtype", "bf16")[0]
        == 0
    )

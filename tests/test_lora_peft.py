"""LoRA through its real consumer, PEFT, and through the command lines.

- llm-train --init-from BASE --lora-rank: an adapter checkpoint; llm-export --adapter-only
  writes a PEFT folder that peft.PeftModel.from_pretrained loads onto our HF export of the
  base: our logits within 1e-4 and our greedy tokens.
- A LoRA adapter made by PEFT itself for a Llama folder: llm-import --adapter gives PEFT's
  logits.
- --merge-on-save, llm-chat on an adapter checkpoint, flag errors in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from factories import run_cli, tiny_model, tiny_tokenizer
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from tritonlm.cli import export as export_cli
from tritonlm.cli import import_hf as import_cli
from tritonlm.cli import train as train_cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint
from tritonlm.engine.inference.generate import generate
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.engine.lora.adapter_checkpoint import is_adapter_checkpoint, load_model
from tritonlm.engine.lora.layers import lora_layers

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

WORDS = ("apple", "tree", "river", "stone", "cloud", "house", "bread", "music")
CHATS = [(f"what is {w}?", f"{w} is a word of {len(w)} letters.") for w in WORDS]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny grouped-query base checkpoint (untied head) and a chat file."""
    root = tmp_path_factory.mktemp("lora")
    texts = [f"{u} {a}" for u, a in CHATS] * 3
    tok = tiny_tokenizer(texts, vocab_size=300)
    # grouped-query, untied head; peaked logits (init_std 0.2): greedy decoding has no ties
    model = tiny_model(tok, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                       tie_embeddings=False, init_std=0.2)  # fmt: skip
    save_checkpoint(root / "base", model, tok)
    chats = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}
             for u, a in CHATS]  # fmt: skip
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return root


def train_lora(root, out, *extra):
    argv = ["--init-from", root / "base", "--chat-data", root / "chats.jsonl", "--out", out,
            "--steps", "6", "--batch-size", "4", "--lr", "2e-2", "--eval-every", "0",
            "--device", "cpu", "--quiet", "--lora-rank", "4", *extra]  # fmt: skip
    return train_cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def adapter_run(base, restore_threads_module):
    out = base / "run"
    assert train_lora(base, out, "--lora-alpha", "8") == 0
    return out


@pytest.fixture(scope="module")
def restore_threads_module():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def test_adapter_checkpoint_from_llm_train(base, adapter_run):
    assert is_adapter_checkpoint(adapter_run)
    cfg = json.loads((adapter_run / "config.json").read_text())
    assert cfg["lora_config"]["rank"] == 4 and cfg["lora_config"]["alpha"] == 8.0
    assert cfg["base"]["path"] == str((base / "base").resolve())
    unmerged = load_model(adapter_run, backend="torch", merge=False).model
    assert len(lora_layers(unmerged)) == 8
    assert any(m.lora_B.abs().max() > 0 for m in lora_layers(unmerged).values())
    size = sum(p.stat().st_size for p in adapter_run.glob("adapter*.safetensors"))
    assert size < sum(p.stat().st_size for p in (base / "base").glob("model*.safetensors")) / 4


def test_peft_loads_our_adapter_export_onto_our_hf_base(base, adapter_run, tmp_path, capsys):
    assert export_cli.main([str(base / "base"), str(tmp_path / "hf")]) == 0
    assert export_cli.main([str(adapter_run), str(tmp_path / "peft"), "--adapter-only"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "peft").eval()
    ckpt = load_model(adapter_run, backend="torch")  # merged at load
    tok, ours = ckpt.tokenizer, ckpt.model
    prompt, _ = tok.render_chat([{"role": "user", "content": "what is tree?"}],
                                add_generation_prompt=True)  # fmt: skip
    with torch.no_grad():
        x = torch.tensor([prompt])
        theirs = peft_model(x).logits
        assert (theirs - ours(x)).abs().max().item() < 1e-4
        unmerged = load_model(adapter_run, backend="torch", merge=False).model.eval()
        assert (theirs - unmerged(x)).abs().max().item() < 1e-4
    mine = generate(ours, tok, prompt, SamplingConfig(temperature=0, max_new_tokens=12))
    got = peft_model.generate(x, do_sample=False, max_new_tokens=len(mine.token_ids),
                              min_new_tokens=len(mine.token_ids))  # fmt: skip
    assert got[0, len(prompt) :].tolist() == mine.token_ids


def test_a_peft_adapter_imports_with_peft_logits(base, tmp_path, capsys):
    assert export_cli.main([str(base / "base"), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    torch.manual_seed(3)
    cfg = PeftLoraConfig(r=4, lora_alpha=12, target_modules=targets, init_lora_weights=False,
                         task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(hf, cfg).eval()
    peft_model.save_pretrained(tmp_path / "adapter")
    rc = import_cli.main([str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--adapter",
                          str(tmp_path / "adapter")])  # fmt: skip
    assert rc == 0
    ours = load_checkpoint(tmp_path / "ckpt", backend="torch").model
    x = torch.randint(0, ours.config.vocab_size, (2, 20))
    with torch.no_grad():
        expected = peft_model(x).logits
        with peft_model.disable_adapter():  # the adapter is not a no-op
            assert (expected - peft_model(x).logits).abs().max() > 1e-2
        assert (expected - ours(x)).abs().max().item() < 1e-4


def test_merge_on_save_and_chat_on_an_adapter_checkpoint(base, adapter_run, tmp_path, capsys):
    from tritonlm.cli import chat as chat_cli

    out = tmp_path / "merged"
    assert train_lora(base, out, "--lora-alpha", "8", "--merge-on-save") == 0
    assert not is_adapter_checkpoint(out)
    merged = load_checkpoint(out, backend="torch").model
    adapted = load_model(adapter_run, backend="torch").model
    for name, t in adapted.state_dict().items():  # the same run, merged at save or at load
        torch.testing.assert_close(merged.state_dict()[name], t, atol=1e-6, rtol=1e-6)
    # llm-eval and a GGUF export take the adapter checkpoint as they take any other
    from tritonlm.cli import evaluate as eval_cli

    capsys.readouterr()
    texts = tmp_path / "held_out.json"
    texts.write_text(json.dumps([f"{u} {a}" for u, a in CHATS[:3]]))
    rc, out_text, err = run_cli(eval_cli.main, capsys, adapter_run, "--data", texts, "--json",
                                "--quiet", "--device", "cpu")  # fmt: skip
    assert rc == 0, err
    merged_rc, merged_text, _ = run_cli(eval_cli.main, capsys, out, "--data", texts, "--json",
                                        "--quiet", "--device", "cpu")  # fmt: skip
    assert rc == merged_rc == 0
    bpb = [json.loads(t)["text"]["bits_per_byte"] for t in (out_text, merged_text)]
    assert bpb[0] == pytest.approx(bpb[1], rel=1e-5)
    rc, _, _ = run_cli(export_cli.main, capsys, adapter_run, tmp_path / "m.gguf", "--dtype", "f32")
    assert rc == 0 and (tmp_path / "m.gguf").stat().st_size > 0
    rc = chat_cli.main([str(adapter_run), "--prompt", "what is tree?", "--temperature", "0",
                        "--max-new-tokens", "4"])  # fmt: skip
    assert rc == 0 and capsys.readouterr().out.strip()


@pytest.mark.parametrize("extra, word", [
    (["--lora-rank", "0"], "--lora-rank must be >= 1"),
    (["--lora-rank", "2", "--lora-targets", "qkv,embed"], "--lora-targets: unknown layer"),
    (["--lora-alpha", "4"], "--lora-alpha needs --lora-rank"),
    (["--merge-on-save"], "--merge-on-save needs --lora-rank"),
])  # fmt: skip
def test_bad_lora_flags_are_one_line(base, tmp_path, capsys, extra, word):
    argv = ["--init-from", base / "base", "--chat-data", base / "chats.jsonl",
            "--out", tmp_path / "x", "--quiet", *extra]  # fmt: skip
    rc, _, err = run_cli(train_cli.main, capsys, *argv)
    assert rc == 2 and word in err and len(err.strip().splitlines()) == 1


def test_lora_needs_a_base(base, tmp_path, capsys):
    argv = ["--chat-data", base / "chats.jsonl", "--out", tmp_path / "x", "--lora-rank", "4"]
    rc, _, err = run_cli(train_cli.main, capsys, *argv)
    assert rc == 2 and "--init-from" in err


def test_packed_sft_and_the_loss_guard_train_adapters(base, tmp_path):
    out = tmp_path / "packed"
    assert train_lora(base, out, "--pack") == 0  # the loss guard is on by default
    state = json.loads((out / "trainer_state.json").read_text())["trainer_state"]
    assert state["train_config"]["pack"] and state["train_config"]["guard"]
    assert is_adapter_checkpoint(out)
    assert lora_layers(load_model(out, backend="torch", merge=False).model)

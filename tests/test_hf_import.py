"""llm-import of Hugging Face Llama/Mistral folders built here with transformers and tokenizers.

Each folder holds a random small model (with and without grouped-query attention, tied
and untied, one file or shards, fp32 or bf16) and a byte-level BPE tokenizer trained in
the test. After the import our model must give the HF model's logits (1e-4) on the same
text, and our tokenizer the same tokens. What we cannot represent is refused in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # test dependencies: the producers of the folders
from chat_fixtures import trained_checkpoint
from factories import run_cli
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tritonlm.cli import export as export_cli
from tritonlm.cli import import_hf as import_cli
from tritonlm.cli import train as train_cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.interop.hf_tokenizer import import_hf_tokenizer

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Tokenizers split text into pieces; models read the pieces, 1234 of them.",
    "Ünïcode tëxt, emoji 😀 and tabs\tand\nnewlines are bytes too.",
    "Small models are fine-tuned on chats: user asks, assistant answers.",
] * 4
HELD_OUT = "A lazy fox reads 56789 pieces of tëxt 😀\n\tthen answers the quick user."
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def hf_tokenizer() -> Tokenizer:
    """Byte-level BPE as GPT-2/SmolLM train it: specials first (ids 0..2), then the 256
    byte characters, then merges (so our id layout differs and rows must be permuted)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_folder(path: Path, tok: Tokenizer, arch="llama", dtype=torch.float32, shard=None,
                 **config) -> transformers.PreTrainedModel:  # fmt: skip
    """A random HF model + the tokenizer saved in ``path``; returns the model as float32."""
    shape = dict(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=48,
                 num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                 rms_norm_eps=1e-5, initializer_range=0.2, bos_token_id=None,
                 eos_token_id=0, pad_token_id=None)  # fmt: skip
    shape.update(config)
    if arch == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape))
    else:
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**shape))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norms away from 1: a misplaced norm would show
                p.uniform_(0.5, 1.5)
    model = model.to(dtype).eval()
    model.save_pretrained(path, max_shard_size=shard or "5GB")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    if dtype == torch.float32:
        return model
    # reloaded rather than model.float(): .to(bf16) also rounded its RoPE frequencies
    return type(model).from_pretrained(path, dtype=torch.float32).eval()


def check_same_model(folder: Path, ckpt: Path, theirs, hf_tok: Tokenizer) -> None:
    """Same tokens on held-out text and the HF logits (our rows are hf_ids' rows)."""
    ours = load_checkpoint(ckpt, backend="torch")
    hf_ids = import_hf_tokenizer(folder).hf_ids
    mine = ours.tokenizer.encode(HELD_OUT)
    want = hf_tok.encode(HELD_OUT).ids
    assert [hf_ids[i] for i in mine] == want
    with torch.no_grad():
        got = ours.model(torch.tensor([mine]))[0]
        ref = theirs(torch.tensor([want])).logits[0][:, hf_ids]
    assert got.shape == ref.shape and (got - ref).abs().max().item() < 1e-4
    assert ref.abs().max().item() > 0.5  # the comparison is not between near-zero logits


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize(
    "kv_heads, tie, shard",
    [(4, True, None), (2, False, None), (1, True, "12KB"), (2, True, "12KB")],
)
def test_import_gives_hf_logits_and_tokens(hf_tokenizer, tmp_path, capsys, kv_heads, tie, shard):
    folder = tmp_path / "hf"
    theirs = write_folder(folder, hf_tokenizer, num_key_value_heads=kv_heads,
                          tie_word_embeddings=tie, shard=shard)  # fmt: skip
    assert (folder / "model.safetensors.index.json").exists() == (shard is not None)
    rc, out, err = run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")
    assert rc == 0 and f"{kv_heads} kv heads" in out, err
    assert err == "llm-import: note: no chat template: raw mode only\n"
    check_same_model(folder, tmp_path / "ckpt", theirs, hf_tokenizer)
    cfg = load_checkpoint(tmp_path / "ckpt").model_config
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.norm_eps) == (kv_heads, tie, 1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_folders(hf_tokenizer, tmp_path, capsys, dtype):
    folder = tmp_path / "hf"
    theirs = write_folder(folder, hf_tokenizer, dtype=dtype, num_key_value_heads=2)
    assert run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")[0] == 0
    check_same_model(folder, tmp_path / "ckpt", theirs, hf_tokenizer)  # theirs: upcast copy


def test_mistral_without_sliding_window(hf_tokenizer, tmp_path, capsys):
    folder = tmp_path / "hf"
    theirs = write_folder(folder, hf_tokenizer, arch="mistral", num_key_value_heads=2,
                          sliding_window=None, tie_word_embeddings=False)  # fmt: skip
    assert run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")[0] == 0
    check_same_model(folder, tmp_path / "ckpt", theirs, hf_tokenizer)


def test_export_then_import_is_the_identity(tmp_path_factory, tmp_path, capsys):
    ckpt = trained_checkpoint(tmp_path_factory)
    assert export_cli.main([str(ckpt), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    rc, _, err = run_cli(import_cli.main, capsys, tmp_path / "hf", tmp_path / "back")
    assert rc == 0, err
    a, b = load_checkpoint(ckpt), load_checkpoint(tmp_path / "back")
    assert a.tokenizer.to_json() == b.tokenizer.to_json()
    assert a.model_config == b.model_config
    wa, wb = load_file(str(ckpt / "model.safetensors")), a.model.state_dict()
    wb = b.model.state_dict()
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("bos", [True, False])
def test_train_init_from_a_hugging_face_folder(hf_tokenizer, tmp_path, capsys, bos):
    """Pretraining from an imported model, whose tokenizer may put a bos before each
    document (Llama-3 style post-processor) or not (GPT-2, SmolLM)."""
    folder = tmp_path / "hf"
    tok = Tokenizer.from_str(hf_tokenizer.to_str())
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
        )
    write_folder(folder, tok, num_key_value_heads=2)
    data = tmp_path / "pre.json"
    data.write_text(json.dumps(CORPUS))
    rc = train_cli.main([
        "--init-from", str(folder), "--data", str(data), "--out", str(tmp_path / "ft"),
        "--steps", "2", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0",
        "--quiet", "--threads", "1", "--workers", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    imported = import_hf_tokenizer(folder).tokenizer
    trained = load_checkpoint(tmp_path / "ft")
    assert trained.tokenizer.to_json() == imported.to_json()  # taken over, not trained
    assert trained.model_config.n_kv_heads == 2 and trained.model_config.d_model == 32


def test_chat_with_an_imported_model(hf_tokenizer, tmp_path, capsys):
    """No chat template came along: chat mode is one clear line, raw mode continues text."""
    from tritonlm.cli import chat as chat_cli

    folder = tmp_path / "hf"
    write_folder(folder, hf_tokenizer, num_key_value_heads=2, max_position_embeddings=4096)
    assert run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")[0] == 0
    rc = chat_cli.main([str(tmp_path / "ckpt"), "--prompt", "The quick", "--temperature", "0"])
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1 and "--raw" in err, err
    rc = chat_cli.main([str(tmp_path / "ckpt"), "--raw", "--prompt", "The quick",
                        "--temperature", "0", "--max-new-tokens", "5"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0 and out.strip(), err


# ----------------------------------------------------------------------------- refusals


def _edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


REFUSALS = {
    "attention_bias": (dict(attention_bias=True), "attention_bias"),
    "mlp_bias": (dict(mlp_bias=True), "mlp_bias"),
    "rope llama3": (
        dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
        "rope_parameters has rope type 'llama3'",
    ),
    "rope_scaling": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
    "act": (dict(hidden_act="gelu"), "hidden_act"),
    "head_dim": (dict(head_dim=16), "head_dim"),
    "arch": (dict(architectures=["Qwen2ForCausalLM"]), "architectures"),
    "window": (dict(sliding_window=16), "sliding_window"),
    "quantized": (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
    "untied without head": (dict(tie_word_embeddings=False), "no lm_head.weight"),
    "heads": (dict(num_key_value_heads=3), "num_key_value_heads (3) does not divide"),
    "odd head dim": (dict(hidden_size=36, head_dim=None), "num_attention_heads) is 9: an odd"),
}


@pytest.fixture(scope="module")
def good_folder(hf_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("good") / "hf"
    write_folder(folder, hf_tokenizer, tie_word_embeddings=True)
    return folder


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_field(good_folder, tmp_path, capsys, case):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(good_folder, folder)
    changes, message = REFUSALS[case]
    _edit_config(folder, **changes)
    rc, out, err = run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert err.startswith("llm-import: error: ") and message in err
    assert not (tmp_path / "ckpt").exists()


def test_tied_config_with_a_different_head_is_refused(hf_tokenizer, tmp_path, capsys):
    folder = tmp_path / "hf"
    write_folder(folder, hf_tokenizer, tie_word_embeddings=False)  # lm_head.weight of its own
    _edit_config(folder, tie_word_embeddings=True)
    rc, _, err = run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")
    assert rc == 2 and "tie_word_embeddings is true but lm_head.weight differs" in err


def test_bad_folders_and_targets(good_folder, tmp_path, capsys):
    rc, _, err = run_cli(import_cli.main, capsys, tmp_path / "nope", tmp_path / "ckpt")
    assert rc == 2 and "not a directory" in err
    rc, _, err = run_cli(import_cli.main, capsys, good_folder, good_folder)
    assert rc == 2 and "is the folder being imported" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    rc, _, err = run_cli(import_cli.main, capsys, good_folder, mine)
    assert rc == 2 and "not empty" in err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    rc, _, err = run_cli(import_cli.main, capsys, empty, tmp_path / "ckpt")
    assert rc == 2 and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, message",
    [
        ("model.layers.0.self_attn.q_proj.bias", "biases are not supported"),
        ("model.layers.0.mlp.experts.weight", "unexpected tensor"),
    ],
)
def test_tensors_we_would_drop_are_refused(good_folder, tmp_path, capsys, extra, message):
    import shutil

    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    shutil.copytree(good_folder, folder)
    weights = load_file(str(folder / "model.safetensors"))
    weights[extra] = torch.ones(32)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    rc, _, err = run_cli(import_cli.main, capsys, folder, tmp_path / "ckpt")
    assert rc == 2 and err.count("\n") == 1 and extra in err and message in err

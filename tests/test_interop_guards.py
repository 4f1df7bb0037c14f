"""llm-export and llm-import never lose data or mislead: a file that is not a GGUF is not
overwritten, an existing checkpoint (a resumable run above all) is not replaced without
--force, contradictions and impossible sizes are one line, the messages name the problem."""

import shutil

import pytest
import torch
from chat_fixtures import trained_checkpoint
from factories import run_cli
from test_hf_import import _edit_config, hf_tokenizer, write_folder  # noqa: F401
from tritonlm.cli import export as export_cli
from tritonlm.cli import import_hf as import_cli
from tritonlm.engine.checkpoint.save_load import load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return trained_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def hf_folder(hf_tokenizer, tmp_path_factory):  # noqa: F811
    folder = tmp_path_factory.mktemp("guards") / "hf"
    write_folder(folder, hf_tokenizer, tie_word_embeddings=True)
    return folder


def _export(capsys, *argv):
    return run_cli(export_cli.main, capsys, *argv)


def run_import(capsys, *argv):
    return run_cli(import_cli.main, capsys, *argv)


@pytest.mark.parametrize(
    "content", [b"my notes\n", b"", b"GGU", b"\x00" * 64], ids=["text", "empty", "short", "zeros"]
)
def test_gguf_export_keeps_a_file_that_is_not_gguf(ckpt, tmp_path, capsys, content):
    notes = tmp_path / "notes.gguf"
    notes.write_bytes(content)
    rc, out, err = _export(capsys, ckpt, notes)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "is not a GGUF file" in err and "--force" in err
    assert notes.read_bytes() == content
    assert [p.name for p in tmp_path.iterdir()] == ["notes.gguf"]  # no temporary left


def test_gguf_export_replaces_a_gguf_file_or_anything_with_force(ckpt, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert _export(capsys, ckpt, out)[0] == 0
    first = out.read_bytes()
    assert first[:4] == b"GGUF"
    assert _export(capsys, ckpt, out, "--dtype", "f32")[0] == 0  # a GGUF: replaced
    assert out.read_bytes()[:4] == b"GGUF" and out.read_bytes() != first
    link = tmp_path / "link.gguf"
    link.symlink_to(out)  # a link to a GGUF is not replaced either: it is not a GGUF file
    assert _export(capsys, ckpt, link)[0] == 2
    notes = tmp_path / "notes.gguf"
    notes.write_text("mine")
    assert _export(capsys, ckpt, notes, "--force")[0] == 0
    assert notes.read_bytes()[:4] == b"GGUF"


def test_export_to_an_unwritable_place_names_it_not_a_temporary(ckpt, tmp_path, capsys):
    for out in ("/proc/tritonlm-out", "/proc/tritonlm-out.gguf"):
        rc, _, err = _export(capsys, ckpt, out)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"cannot write {out}" in err and ".tmp" not in err and "Errno" not in err


def _resumable(path, source):
    """A copy of ``source`` saved with optimizer state, as a training run saves it."""
    loaded = load_checkpoint(source)
    opt = torch.optim.AdamW(loaded.model.parameters(), lr=1e-3)
    loaded.model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    save_checkpoint(path, loaded.model, loaded.tokenizer, {"steps": 1}, optimizer=opt,
                    trainer_state={"step": 1})  # fmt: skip
    return path


def test_import_keeps_an_existing_checkpoint_without_force(ckpt, hf_folder, tmp_path, capsys):
    run = _resumable(tmp_path / "run", ckpt)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    assert "optimizer.safetensors" in before
    rc, out, err = run_import(capsys, hf_folder, run)
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert "resumable training run" in err and "--force" in err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain)
    rc, _, err = run_import(capsys, hf_folder, plain)
    assert rc == 2 and "existing tritonlm checkpoint" in err and "--force" in err
    rc, _, err = run_import(capsys, hf_folder, run, "--force")
    assert rc == 0, err
    assert not (run / "optimizer.safetensors").exists()
    assert load_checkpoint(run).tokenizer.vocab_size != load_checkpoint(plain).tokenizer.vocab_size


def test_importing_our_own_checkpoint_says_so(ckpt, tmp_path, capsys):
    rc, _, err = run_import(capsys, ckpt, tmp_path / "out")
    assert rc == 2 and err.count("\n") == 1
    assert "is a tritonlm checkpoint, not a Hugging Face folder" in err
    assert not (tmp_path / "out").exists()


CONTRADICTIONS = {
    "rope_parameters": (
        dict(rope_theta=500000.0, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        ["rope_theta is 500000.0", "rope_parameters.rope_theta is 10000.0"],
    ),  # fmt: skip
    "rope_scaling": (
        dict(
            rope_theta=10000.0,
            rope_parameters=None,
            rope_scaling={"rope_type": "default", "rope_theta": 20000},
        ),
        ["rope_theta is 10000.0", "rope_scaling.rope_theta is 20000"],
    ),  # fmt: skip
    "vocab_size": (dict(vocab_size=500), ["vocab_size is 500", "embed_tokens.weight has 402 rows"]),
    "positions 1e12": (
        dict(max_position_embeddings=10**12),
        ["max_position_embeddings 1000000000000", "GiB"],
    ),  # fmt: skip
    "positions 1e10": (
        dict(max_position_embeddings=10**10),
        ["max_position_embeddings 10000000000", "GiB"],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(CONTRADICTIONS))
def test_contradictions_and_impossible_sizes_are_one_line(hf_folder, tmp_path, capsys, case):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    changes, words = CONTRADICTIONS[case]
    _edit_config(folder, **changes)
    rc, out, err = run_import(capsys, folder, tmp_path / "ckpt")
    assert rc == 2 and out == "" and err.count("\n") == 1, err
    assert all(w in err for w in words), err
    assert not (tmp_path / "ckpt").exists()


def test_agreeing_rope_thetas_import(hf_folder, tmp_path, capsys):
    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    _edit_config(folder, rope_theta=20000, rope_parameters={"rope_type": "default",
                 "rope_theta": 20000.0})  # fmt: skip
    rc, _, err = run_import(capsys, folder, tmp_path / "ckpt")
    assert rc == 0, err
    assert load_checkpoint(tmp_path / "ckpt").model_config.rope_theta == 20000.0

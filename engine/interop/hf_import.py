"""Import a Hugging Face Llama/Mistral folder as one of our models (and checkpoints).

    HF_DIR/config.json          -> ModelConfig (hf_config.from_hf_config refuses what we
                                   would compute differently, naming the field)
    HF_DIR/tokenizer.json ...   -> our BpeTokenizer + hf_ids (hf_tokenizer.import_hf_tokenizer)
    HF_DIR/model*.safetensors   -> our weights, one tensor at a time

Our vocabulary is laid out our way (bytes, merges by rank, then specials), so the
embedding and output rows are permuted: our row i is HF row ``hf_ids[i]``. An id of ours
that has no HF token (a control token the HF vocabulary lacks) gets a zero row: it is
never produced by encoding and its logit is 0.

Memory: the model is allocated once, in float32, without initialization; each HF tensor
is read from its shard, cast and copied into its slice of ours, and dropped. The peak is
the float32 model plus about the largest tensor and the tokenizer's tables: under twice
the model's bytes (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tritonlm.engine.interop.hf_format import HFFormatError
from tritonlm.engine.interop.hf_tokenizer import import_hf_tokenizer

from ..checkpoint.checkpoint_store import resolve
from ..checkpoint.save_load import save_checkpoint
from ..checkpoint.shards import read_headers, shard_files
from ..model.memory import build_bytes, too_big
from ..model.transformer import Transformer, rope_tables
from ..tokenizer.bpe_tokenizer import BpeTokenizer
from .hf_config import from_hf_config, hf_shape, weight_table

_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_ROWS = 4096  # vocabulary rows permuted per copy (bounds the temporary)
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some older exports saved; recomputed here


@dataclass
class ImportedModel:
    """An imported model, its tokenizer, and what the import had to say (chat template)."""

    model: Transformer
    tokenizer: BpeTokenizer
    hf_ids: list[int | None]
    notes: list[str] = field(default_factory=list)


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise HFFormatError(f"{path}: file is missing (not a Hugging Face model folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError) as e:
        raise HFFormatError(f"{path}: malformed JSON ({type(e).__name__})") from None


def _vocab_rows(hf_ids: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the HF row for each of our rows, and a mask of ours without one."""
    missing = torch.tensor([h is None or h < 0 for h in hf_ids], dtype=torch.bool)
    index = torch.tensor([0 if h is None or h < 0 else h for h in hf_ids], dtype=torch.long)
    return index, missing


def _permute_rows(dest: torch.Tensor, src: torch.Tensor, index, missing) -> None:
    """dest[i] = src[index[i]] (zero where missing), a block of rows at a time."""
    for a in range(0, len(index), _ROWS):
        dest[a : a + _ROWS].copy_(src[index[a : a + _ROWS]])
    dest[missing] = 0.0


def _plain_tensors(folder: Path):
    """(name, tensor) of every weight, read from the shards with ordinary file reads, one
    tensor at a time. Not through mmap: the mapped pages of a whole shard would count in
    the process's memory until it is closed, doubling the peak of a single-file model.
    The headers were checked by read_headers (safetensors' own parser) beforehand."""
    for file in shard_files(folder):
        if not file.endswith(".safetensors"):
            continue  # the index
        path = folder / file
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")  # header length, then the JSON header
            header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, stop = info["data_offsets"]
                dtype, shape = _TORCH_DTYPES.get(info["dtype"]), info["shape"]
                if dtype is None or stop == start:  # refused or empty: nothing to read
                    yield name, torch.empty(shape, dtype=dtype or torch.float32)
                    continue
                buf = bytearray(stop - start)
                f.seek(8 + n + start)
                if f.readinto(buf) != len(buf):
                    raise HFFormatError(f"{path}: truncated inside {name}")
                yield name, torch.frombuffer(buf, dtype=dtype).reshape(shape)


def _check_tensors(folder: Path, cfg, headers: dict, hf_rows: int) -> set[str]:
    """Every expected tensor present with the right shape and a float dtype; nothing we
    would silently drop. Returns the names to skip while loading."""
    ours = {n: tuple(p.shape) for n, p in _meta_shapes(cfg).items()}
    expected = {}
    for s in weight_table(cfg):
        shape = hf_shape(s, ours[s.ours])
        if s.ours in ("tok_emb.weight", "lm_head.weight"):
            shape = (hf_rows, cfg.d_model)
        expected[s.hf] = shape
    skip = {n for n in headers if n.endswith(_IGNORED)}
    if cfg.tie_embeddings and "lm_head.weight" in headers:
        expected["lm_head.weight"] = (hf_rows, cfg.d_model)  # must equal the embedding
    if not cfg.tie_embeddings and "lm_head.weight" not in headers:
        raise HFFormatError("config.json: tie_word_embeddings is false but the weights have "
                            "no lm_head.weight")  # fmt: skip
    for name, info in headers.items():
        if name in skip:
            continue
        if name not in expected and name.endswith(".bias"):
            raise HFFormatError(f"{info.file}: {name}: biases are not supported")
        if name not in expected:
            raise HFFormatError(f"{info.file}: {name} is not a weight of this Llama model "
                                "(unexpected tensor)")  # fmt: skip
        if info.dtype not in _TORCH_DTYPES:
            raise HFFormatError(f"{info.file}: {name} has dtype {info.dtype}; only F32, BF16 "
                                "and F16 weights can be imported")  # fmt: skip
        if info.shape != expected[name]:
            raise HFFormatError(f"{info.file}: {name} has shape {list(info.shape)}, config.json "
                                f"implies {list(expected[name])}")  # fmt: skip
    absent = sorted(set(expected) - set(headers))
    if absent:
        raise HFFormatError(f"{folder}: the weights lack {absent[0]}")
    return skip


def _meta_shapes(cfg) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return Transformer(cfg, backend="torch").state_dict()


def _empty_model(cfg, backend: str) -> Transformer:
    """A float32 model with allocated but uninitialized weights (every one is then
    overwritten), RoPE tables recomputed (to_empty leaves buffers uninitialized too)."""
    with torch.device("meta"):
        model = Transformer(cfg, backend=backend)
    model.to_empty(device="cpu")
    model.rope_cos, model.rope_sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    return model


def load_hf(folder: str | os.PathLike, backend: str = "auto") -> ImportedModel:
    """Our model and tokenizer for the HF folder (see the module docstring)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HFFormatError(f"{folder}: not a directory")
    hf_config = _read_config(folder)
    if isinstance(hf_config, dict) and hf_config.get("format") == "tritonlm-checkpoint":
        raise HFFormatError(f"{folder}: is a tritonlm checkpoint, not a Hugging Face folder; "
                            "use it as it is (chat with it, or train from it with "
                            "`init_from`) or export it to a Hugging Face folder first")  # fmt: skip
    imported = import_hf_tokenizer(folder)
    tok, hf_ids = imported.tokenizer, list(imported.hf_ids)
    cfg = from_hf_config(hf_config, tok.vocab_size)
    headers = read_headers(folder)
    emb = headers.get("model.embed_tokens.weight")
    if emb is None:
        raise HFFormatError(f"{folder}: the weights lack model.embed_tokens.weight")
    hf_rows = emb.shape[0]
    declared = hf_config.get("vocab_size")
    if declared is not None and declared != hf_rows:
        raise HFFormatError(f"config.json: vocab_size is {declared!r} but "
                            f"model.embed_tokens.weight has {hf_rows} rows")  # fmt: skip
    top = max((h for h in hf_ids if h is not None), default=-1)
    if top >= hf_rows:
        raise HFFormatError(f"{folder}: the tokenizer has id {top}, the embedding only "
                            f"{hf_rows} rows")  # fmt: skip
    skip = _check_tensors(folder, cfg, headers, hf_rows)
    reason = too_big(build_bytes(cfg), torch.device("cpu"))  # weights and RoPE tables
    if reason:
        raise HFFormatError(f"config.json: building this model (max_position_embeddings "
                            f"{cfg.max_seq_len}) {reason}")  # fmt: skip

    model = _empty_model(cfg, backend)
    params = dict(model.named_parameters())
    where = {s.hf: s for s in weight_table(cfg)}
    index, missing = _vocab_rows(hf_ids)
    tied_head = None
    with torch.no_grad():
        for name, t in _plain_tensors(folder):
            if name in skip:
                continue
            if name == "lm_head.weight" and cfg.tie_embeddings:  # compared below
                tied_head = torch.empty_like(params["tok_emb.weight"])
                _permute_rows(tied_head, t, index, missing)
                continue
            s = where[name]
            dest = params[s.ours] if s.stop is None else params[s.ours][s.start : s.stop]
            if s.ours in ("tok_emb.weight", "lm_head.weight"):
                _permute_rows(dest, t, index, missing)
            else:
                dest.copy_(t)
            del t
        if tied_head is not None:
            if not torch.equal(tied_head, params["tok_emb.weight"]):
                raise HFFormatError("config.json: tie_word_embeddings is true but lm_head.weight "
                                    "differs from the embedding")  # fmt: skip
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise HFFormatError(f"{folder}: the weights of {name} hold NaN or infinity")
    return ImportedModel(model.eval(), tok, hf_ids, list(imported.notes))


def check_import_target(out: Path, source: Path, force: bool = False) -> None:
    """OUT may be new or empty; one of our checkpoints only with ``force`` (a resumable
    run's optimizer and trainer state would be lost); never the HF folder itself."""
    if out.exists() and source.exists() and out.resolve() == source.resolve():
        raise HFFormatError(f"{out}: is the folder being imported; choose another OUT")
    if out.exists() and not out.is_dir():
        raise HFFormatError(f"{out}: exists and is not a directory")
    if not out.is_dir() or not any(out.iterdir()):
        return
    cfg = _checkpoint_config(out)
    if cfg is None:
        raise HFFormatError(f"{out}: directory is not empty and not a tritonlm checkpoint; "
                            "choose a new or empty directory")  # fmt: skip
    if not force:
        what = ("a resumable training run (its optimizer and trainer state would be lost)"
                if cfg.get("resumable") else "an existing tritonlm checkpoint")  # fmt: skip
        raise HFFormatError(f"{out}: is {what}; choose a new directory, or `force` to "
                            "replace it")  # fmt: skip


def _checkpoint_config(path: Path) -> dict | None:
    """The config.json of our checkpoint at ``path`` (or its fallback), else None."""
    root = resolve(path)
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, TypeError):
        return None
    return cfg if isinstance(cfg, dict) and cfg.get("format") == "tritonlm-checkpoint" else None


def import_hf(folder: str | os.PathLike, out: str | os.PathLike,
              force: bool = False) -> ImportedModel:  # fmt: skip
    """Import the HF folder and save it as our checkpoint ``out`` (written atomically);
    an existing checkpoint there is replaced only with ``force``."""
    check_import_target(Path(out), Path(folder), force)
    imported = load_hf(folder, backend="torch")
    source = {"imported_from": str(Path(folder).resolve()), "notes": imported.notes}
    save_checkpoint(out, imported.model, imported.tokenizer, train_config=source)
    return imported

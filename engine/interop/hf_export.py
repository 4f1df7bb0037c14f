"""Export a model and its tokenizer as a Hugging Face ``LlamaForCausalLM`` folder.

    OUT/
      config.json                  LlamaForCausalLM with our shape (see hf_config)
      generation_config.json       bos, pad, and every control token that ends an answer as eos
      model.safetensors            or model-0000i-of-0000N.safetensors + the index (shards)
      tokenizer.json, tokenizer_config.json, ...   from :mod:`.hf_tokenizer`

Token ids are ours unchanged (the exported tokenizer gives our ids), so the embedding and
output rows are written as they are. The folder is written next to OUT under a temporary
name and renamed into place whole: an interrupted export leaves the previous OUT (or
nothing), never half a folder. An existing OUT is replaced only when it is empty or an
earlier export of ours (its safetensors say ``producer: tritonlm``): a folder of someone
else's files is refused rather than deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from tritonlm.engine.interop.hf_format import HFFormatError
from tritonlm.engine.interop.hf_tokenizer import eos_token_ids, hf_tokenizer_files

from ..atomic import fsync_dir, fsync_file
from ..checkpoint.shards import ShardError, shard_files, write_shards
from ..errors import os_reason
from ..model.transformer import Transformer
from .hf_config import HF_DTYPES, to_hf_config, weight_table

PRODUCER = {"format": "pt", "producer": "tritonlm"}  # safetensors header metadata
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FP16_MAX = 65504.0

# --dtype spellings per format: the canonical name of each accepted spelling.
DTYPE_NAMES = {
    "hf": {"fp32": "fp32", "f32": "fp32", "float32": "fp32", "bf16": "bf16",
           "bfloat16": "bf16", "fp16": "fp16", "f16": "fp16", "float16": "fp16"},
    "gguf": {"f32": "f32", "fp32": "f32", "float32": "f32", "f16": "f16", "fp16": "f16",
             "float16": "f16", "bf16": "bf16", "bfloat16": "bf16", "q8_0": "q8_0",
             "q8": "q8_0"},
}  # fmt: skip
DEFAULT_DTYPE = {"hf": "fp32", "gguf": "f16"}


def resolve_format(out: str | os.PathLike, fmt: str | None) -> str:
    """``hf`` or ``gguf``: as given, else gguf when OUT ends with .gguf, else hf."""
    if fmt is None:
        return "gguf" if str(out).lower().endswith(".gguf") else "hf"
    if fmt not in DTYPE_NAMES:
        raise HFFormatError(f"unknown export format {fmt!r}; choose hf or gguf")
    return fmt


def resolve_dtype(fmt: str, dtype: str | None) -> str:
    """The canonical dtype name of a format (``f16`` and ``fp16`` both work for both)."""
    if dtype is None:
        return DEFAULT_DTYPE[fmt]
    names = DTYPE_NAMES[fmt]
    canonical = names.get(dtype.lower())
    if canonical is None:
        choices = ", ".join(sorted(set(names.values())))
        raise HFFormatError(f"dtype {dtype!r} is not available for {fmt}; choose {choices}")
    return canonical


def hf_tensors(model: Transformer, dtype: str) -> dict[str, torch.Tensor]:
    """Our weights under their HF names, cast to ``dtype`` (fp32: views, no copies)."""
    target = TORCH_DTYPES[dtype]
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    for s in weight_table(model.config):
        t = ours[s.ours] if s.stop is None else ours[s.ours][s.start : s.stop]
        if target == torch.float16 and bool((t.abs() > FP16_MAX).any()):
            raise HFFormatError(f"{s.ours} has values beyond float16's range (+-65504); "
                                "export as fp32 or bf16")  # fmt: skip
        out[s.hf] = t.to(target)
    return out


def _is_our_export(folder: Path) -> bool:
    try:
        first = next(f for f in shard_files(folder) if f.endswith(".safetensors"))
        with safe_open(str(folder / first), framework="pt") as f:
            return (f.metadata() or {}).get("producer") == PRODUCER["producer"]
    except (ShardError, StopIteration, OSError, ValueError, RuntimeError):
        return False


def check_out_dir(out: Path) -> None:
    """OUT may be new, empty, or an earlier export of ours (which is then replaced)."""
    if out.exists() and not out.is_dir():
        raise HFFormatError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not _is_our_export(out):
        raise HFFormatError(f"{out}: directory is not empty and not an earlier llm-export "
                            "folder; choose a new or empty directory")  # fmt: skip


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fill(tmp: Path, model: Transformer, tokenizer, dtype: str, max_shard_bytes: int) -> None:
    eos = eos_token_ids(tokenizer)
    bos, pad = tokenizer.bos_id, tokenizer.pad_id
    files = []
    for name, obj in hf_tokenizer_files(tokenizer).items():  # first: it may refuse
        _write_json(tmp / name, obj)
        files.append(name)
    _write_json(tmp / "config.json", to_hf_config(model.config, dtype, bos, eos, pad))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    _write_json(tmp / "generation_config.json", generation)
    files += ["config.json", "generation_config.json"]
    for name in files:
        fsync_file(tmp / name)
    write_shards(tmp, hf_tensors(model, dtype), max_shard_bytes, metadata=PRODUCER)


def export_hf(model: Transformer, tokenizer, out: str | os.PathLike, dtype: str = "fp32",
              max_shard_bytes: int = 5 * 10**9) -> list[str]:  # fmt: skip
    """Write the HF folder ``out`` atomically; return the names of the files in it."""
    if dtype not in HF_DTYPES:
        raise HFFormatError(f"dtype {dtype!r} is not one of {', '.join(HF_DTYPES)}")
    model = getattr(model, "_orig_mod", model)
    if model.config.vocab_size != tokenizer.vocab_size:
        raise HFFormatError(f"model vocab_size {model.config.vocab_size} != tokenizer "
                            f"vocab_size {tokenizer.vocab_size}")  # fmt: skip
    out = Path(out)
    check_out_dir(out)
    try:
        return _write_folder(out, model, tokenizer, dtype, max_shard_bytes)
    except OSError as e:  # name the folder asked for, never the temporary one
        raise HFFormatError(f"cannot write {out}: {os_reason(e)}") from None


def _write_folder(out: Path, model: Transformer, tokenizer, dtype: str,
                  max_shard_bytes: int) -> list[str]:  # fmt: skip
    """Fill a sibling temporary folder, then swap it in (the old export kept until then)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    aside = out.parent / f".{out.name}.old"
    tmp.mkdir()
    try:
        _fill(tmp, model, tokenizer, dtype, max_shard_bytes)
        fsync_dir(tmp)
        if aside.exists():  # left by an export cut off during the swap below
            shutil.rmtree(aside)
        if out.exists():
            os.rename(out, aside)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not out.exists():
            os.rename(aside, out)  # put the previous export back
        raise
    shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(out.parent)
    return sorted(p.name for p in out.iterdir())

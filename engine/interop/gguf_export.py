"""Export a model and its tokenizer to one GGUF file that llama.cpp runs as a ``llama`` model.

What goes into the file (written with the ``gguf`` package, the format's own library):

- ``llama.*`` hyper-parameters: context length, widths, block and head counts (key/value
  heads too), RoPE base and dimension count, RMSNorm epsilon, vocabulary size;
- the tokenizer (:mod:`.gguf_vocab`): byte-level BPE tokens and merges, token types, the
  special ids, the ``llama-bpe`` pre-tokenizer (whose regex and whole-word rule are ours)
  and the chat template;
- every weight under llama.cpp's name, split out of our fused matrices::

      tok_emb.weight                   token_embd.weight
      blocks.{i}.attn_norm.weight      blk.{i}.attn_norm.weight
      blocks.{i}.attn.qkv.weight       blk.{i}.attn_q.weight / attn_k.weight (permuted rows)
                                       blk.{i}.attn_v.weight
      blocks.{i}.attn.proj.weight      blk.{i}.attn_output.weight
      blocks.{i}.ffn_norm.weight       blk.{i}.ffn_norm.weight
      blocks.{i}.ffn.gate_up.weight    blk.{i}.ffn_gate.weight / ffn_up.weight
      blocks.{i}.ffn.down.weight       blk.{i}.ffn_down.weight
      norm.weight                      output_norm.weight
      lm_head.weight (untied only)     output.weight (absent: llama.cpp reuses token_embd)

Why q and k are permuted: our RoPE rotates the pairs (x[i], x[i + D/2]) of each head
("rotate half", the Hugging Face Llama layout); llama.cpp's ``llama`` RoPE rotates
neighbours (x[2i], x[2i+1]) with the same angles. Reordering each head's rows so that row
i goes to 2i and row i + D/2 to 2i + 1 makes llama.cpp's rotation of the permuted
projection the same rotation of ours, so every attention score is unchanged (v is not
rotated and keeps its order).

dtypes: ``f32``; ``f16`` / ``bf16`` (matrices cast, norm weights stay f32, as llama.cpp's
own converter does); ``q8_0`` (matrices in blocks of 32 with one f16 scale, error at most
about half a step of each block's scale; a matrix whose rows are not a multiple of 32 long
falls back to f16, again like llama.cpp's converter).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch

from ..atomic import fsync_dir, fsync_file
from ..errors import os_reason
from ..model.transformer import Transformer
from .gguf_vocab import GGUFExportError, add_vocab, check_vocab

__all__ = ["DTYPES", "export_gguf", "gguf_tensors", "permute_rope_rows"]

DTYPES = ("f32", "f16", "bf16", "q8_0")
ARCH = "llama"
Q8_BLOCK = 32  # values per q8_0 block (llama.cpp's QK8_0)


def permute_rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from rotate-half order to interleaved order.

    Within a head of D rows, row i moves to 2i and row D/2 + i to 2i + 1:

    >>> permute_rope_rows(torch.arange(8.0)[:, None], n_heads=2).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    rows = w.shape[0]
    head_dim = rows // n_heads
    # [H, 2 (halves), D/2, ...] -> [H, D/2, 2, ...]: the halves are interleaved
    return w.reshape(n_heads, 2, head_dim // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _check_model(model: Transformer, dtype: str) -> None:
    if not isinstance(model, Transformer):
        raise GGUFExportError(f"can only export a tritonlm Transformer, got {type(model).__name__}")
    if dtype not in DTYPES:
        raise GGUFExportError(f"unknown GGUF dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    cfg = model.config
    # llama.cpp's llama graph rotates the whole head (n_rot == head_dim) in neighbouring
    # pairs, so the head width must be even; our config already insists on that.
    if cfg.head_dim % 2:
        raise GGUFExportError(
            f"head dimension {cfg.head_dim} is odd; llama.cpp's RoPE needs it even"
        )


def gguf_tensors(model: Transformer) -> list[tuple[str, torch.Tensor]]:
    """(llama.cpp name, float32 CPU tensor) for every weight, in the file's order."""
    cfg = model.config
    H, Hkv, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = [("token_embd.weight", sd["tok_emb.weight"])]
    for i in range(cfg.n_layers):
        p, b = f"blocks.{i}.", f"blk.{i}."
        q, k, v = sd[p + "attn.qkv.weight"].split((H * Dh, Hkv * Dh, Hkv * Dh), dim=0)
        gate, up = sd[p + "ffn.gate_up.weight"].chunk(2, dim=0)  # as SwiGLU.forward splits
        out += [
            (b + "attn_norm.weight", sd[p + "attn_norm.weight"]),
            (b + "attn_q.weight", permute_rope_rows(q, H)),
            (b + "attn_k.weight", permute_rope_rows(k, Hkv)),
            (b + "attn_v.weight", v),
            (b + "attn_output.weight", sd[p + "attn.proj.weight"]),
            (b + "ffn_norm.weight", sd[p + "ffn_norm.weight"]),
            (b + "ffn_gate.weight", gate),
            (b + "ffn_up.weight", up),
            (b + "ffn_down.weight", sd[p + "ffn.down.weight"]),
        ]
    out.append(("output_norm.weight", sd["norm.weight"]))
    if model.lm_head is not None:  # tied: llama.cpp reads token_embd for the output too
        out.append(("output.weight", sd["lm_head.weight"]))
    return [(name, t.contiguous()) for name, t in out]


def _encode_tensor(t: torch.Tensor, dtype: str):
    """(numpy data, GGML type or None for plain f32/f16) of one tensor in the chosen dtype."""
    import gguf

    if t.dim() == 1 or dtype == "f32":  # norm weights stay f32 in every file type
        return t.numpy(), None
    if dtype == "q8_0" and t.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(t.numpy(), gguf.GGMLQuantizationType.Q8_0), (
            gguf.GGMLQuantizationType.Q8_0
        )
    if dtype == "bf16":  # numpy has no bfloat16: store torch's rounding as raw 16-bit words
        raw = t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return raw, gguf.GGMLQuantizationType.BF16
    return t.to(torch.float16).numpy(), None  # f16, and the q8_0 fallback


def _file_type(dtype: str):
    import gguf

    return {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[dtype]


def _add_hparams(writer, model: Transformer, dtype: str, name: str) -> None:
    import gguf

    cfg = model.config
    writer.add_name(name)
    writer.add_file_type(_file_type(dtype))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))


def export_gguf(model: Transformer, tokenizer, out_path: str | os.PathLike, dtype: str,
                force: bool = False) -> None:  # fmt: skip
    """Write ``model`` + ``tokenizer`` to ``out_path`` as GGUF (see the module docstring).

    The file appears complete or not at all: it is written to a temporary file in the same
    folder, flushed to disk, then renamed over ``out_path``. Anything llama.cpp could not
    run the same way raises :class:`GGUFExportError` (one line) before a byte is written.
    An existing file is replaced only if it is a GGUF file (its magic) or ``force``.
    """
    import gguf

    _check_model(model, dtype)
    check_vocab(tokenizer, model.config.vocab_size)
    out_path = Path(out_path)
    if out_path.is_dir():
        raise GGUFExportError(f"{out_path} is a directory; give the .gguf file to write")
    if not out_path.parent.is_dir():
        raise GGUFExportError(f"cannot write {out_path}: folder {out_path.parent} does not exist")
    if not force and (out_path.exists() or out_path.is_symlink()) and not _is_gguf(out_path):
        raise GGUFExportError(f"{out_path} exists and is not a GGUF file; refusing to replace "
                              "it (choose another name, or `force`)")  # fmt: skip
    tmp = out_path.with_name(f".{out_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    writer = gguf.GGUFWriter(tmp, ARCH)
    try:
        _add_hparams(writer, model, dtype, out_path.stem or "tritonlm")
        add_vocab(writer, tokenizer, model.config.vocab_size)
        for name, t in gguf_tensors(model):
            data, raw_dtype = _encode_tensor(t, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        fsync_file(tmp)
        os.replace(tmp, out_path)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # name the file asked for, not the temporary one
            raise GGUFExportError(f"cannot write {out_path}: {os_reason(e)}") from None
        raise
    fsync_dir(out_path.parent)


def _is_gguf(path: Path) -> bool:
    """A regular file that starts with GGUF's magic (a FIFO or device is never opened)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False

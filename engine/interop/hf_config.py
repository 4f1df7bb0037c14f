"""Our model config and weight names <-> the Hugging Face Llama layout, in one table.

Both directions of the conversion (:mod:`.hf_export`, :mod:`.hf_import`) read this
module, so a name or a slice can only be wrong in both ways at once, which the
export -> import identity test catches.

Why no reshuffling is needed: our RoPE rotates the pairs (x[i], x[i + D/2]) ("rotate
half"), exactly like ``transformers``' Llama, with the same frequencies
1 / theta^(2i/D); our RMSNorm, SwiGLU and attention scale are Llama's too. So q/k rows
keep their order and every matrix is a slice of ours:

    tok_emb.weight                    model.embed_tokens.weight
    blocks.i.attn_norm.weight         model.layers.i.input_layernorm.weight
    blocks.i.attn.qkv.weight  rows    [0, d)        q_proj
                                      [d, d+kv)     k_proj      (kv = n_kv_heads*head_dim)
                                      [d+kv, d+2kv) v_proj
    blocks.i.attn.proj.weight         o_proj
    blocks.i.ffn_norm.weight          model.layers.i.post_attention_layernorm.weight
    blocks.i.ffn.gate_up.weight rows  [0, d_ff) gate_proj, [d_ff, 2 d_ff) up_proj
    blocks.i.ffn.down.weight          down_proj
    norm.weight                       model.norm.weight
    lm_head.weight (untied only)      lm_head.weight   (tied: tie_word_embeddings true)
"""

from __future__ import annotations

from typing import Any, NamedTuple

from tritonlm.engine.interop.hf_format import HFFormatError

from ..model.config import ConfigError, ModelConfig

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
HF_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_ROPE_KINDS = (None, "default")  # the only rope type we implement: plain RoPE


class Slice(NamedTuple):
    """HF tensor ``hf`` is rows [start, stop) of our tensor ``ours`` (stop None: all)."""

    hf: str
    ours: str
    start: int = 0
    stop: int | None = None


def weight_table(cfg: ModelConfig) -> list[Slice]:
    """Every HF tensor of a model of shape ``cfg``, in ``transformers``' save order
    (embedding, then block by block, then the final norm and the head)."""
    d, kv, ff = cfg.d_model, cfg.kv_dim, cfg.d_ff
    table = [Slice("model.embed_tokens.weight", "tok_emb.weight")]
    for i in range(cfg.n_layers):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        table += [
            Slice(hf + "input_layernorm.weight", ours + "attn_norm.weight"),
            Slice(hf + "self_attn.q_proj.weight", ours + "attn.qkv.weight", 0, d),
            Slice(hf + "self_attn.k_proj.weight", ours + "attn.qkv.weight", d, d + kv),
            Slice(hf + "self_attn.v_proj.weight", ours + "attn.qkv.weight", d + kv, d + 2 * kv),
            Slice(hf + "self_attn.o_proj.weight", ours + "attn.proj.weight"),
            Slice(hf + "post_attention_layernorm.weight", ours + "ffn_norm.weight"),
            Slice(hf + "mlp.gate_proj.weight", ours + "ffn.gate_up.weight", 0, ff),
            Slice(hf + "mlp.up_proj.weight", ours + "ffn.gate_up.weight", ff, 2 * ff),
            Slice(hf + "mlp.down_proj.weight", ours + "ffn.down.weight"),
        ]
    table.append(Slice("model.norm.weight", "norm.weight"))
    if not cfg.tie_embeddings:
        table.append(Slice("lm_head.weight", "lm_head.weight"))
    return table


def hf_shape(s: Slice, ours: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape given our tensor's shape."""
    if s.stop is None:
        return tuple(ours)
    return (s.stop - s.start, *ours[1:])


# ----------------------------------------------------------------------------- export


def to_hf_config(cfg: ModelConfig, dtype: str, bos: int, eos: list[int], pad: int) -> dict:
    """config.json of a ``LlamaForCausalLM`` with our shape.

    The rope settings are written both the way transformers 5 reads them
    (``rope_parameters``) and the way 4.x does (``rope_theta``), and the dtype as both
    ``dtype`` and ``torch_dtype``, so either generation of the library loads the folder.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "use_cache": True,
        "dtype": HF_DTYPES[dtype],
        "torch_dtype": HF_DTYPES[dtype],
    }


# ----------------------------------------------------------------------------- import


def _refuse(field: str, problem: str) -> HFFormatError:
    return HFFormatError(f"config.json: {field} {problem}")


def _int(hf: dict, field: str, default: int | None = None) -> int:
    v = hf.get(field)
    if v is None:  # absent or null: the default, when the field has one
        if default is None:
            raise _refuse(field, "is missing")
        v = default
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise _refuse(field, f"must be a positive integer, got {v!r}")
    return v


def _number(hf: dict, field: str, default: float) -> float:
    v = hf.get(field)
    v = default if v is None else v
    if isinstance(v, bool) or not isinstance(v, int | float) or not v > 0:
        raise _refuse(field, f"must be a positive number, got {v!r}")
    return float(v)


def _false(hf: dict, field: str, why: str) -> None:
    if hf.get(field) not in (None, False):
        raise _refuse(field, f"is {hf[field]!r}: {why}")


def _rope_theta(hf: dict) -> float:
    """theta of plain RoPE; any scaling scheme (llama3, linear, yarn, ...) is refused, and
    so are two places that give different thetas (which one transformers reads depends on
    its version)."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    theta = hf.get("rope_theta")
    given = {} if theta is None else {"rope_theta": theta}
    for field, spec in (("rope_parameters", params), ("rope_scaling", scaling)):
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise _refuse(field, f"must be an object or null, got {spec!r}")
        kind = spec.get("rope_type", spec.get("type"))
        if kind not in _ROPE_KINDS:
            raise _refuse(field, f"has rope type {kind!r}; only plain RoPE (default) is "
                          "implemented")  # fmt: skip
        if spec.get("rope_theta") is not None:
            given[f"{field}.rope_theta"] = spec["rope_theta"]
    values = list(given.items())
    for field, value in values[1:]:
        if value != values[0][1]:
            raise HFFormatError(f"config.json: {values[0][0]} is {values[0][1]!r} but {field} "
                                f"is {value!r}; they must agree")  # fmt: skip
    theta = values[-1][1] if values else None
    return _number({"rope_theta": theta}, "rope_theta", 10000.0)


def from_hf_config(hf: Any, vocab_size: int) -> ModelConfig:
    """Our ModelConfig for an HF Llama/Mistral config.json (``vocab_size``: our
    tokenizer's). Anything our model would compute differently is refused with an
    HFFormatError naming the field."""
    if not isinstance(hf, dict):
        raise HFFormatError("config.json: must be a JSON object")
    archs = hf.get("architectures")
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise _refuse("architectures", f"is {archs!r}; supported: {', '.join(ARCHITECTURES)}")
    if hf.get("model_type", ARCHITECTURES[archs[0]]) != ARCHITECTURES[archs[0]]:
        raise _refuse("model_type", f"is {hf['model_type']!r}, not {ARCHITECTURES[archs[0]]!r}")
    if hf.get("quantization_config") is not None:
        raise _refuse("quantization_config", "is set: quantized weights are not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", f"is {hf['hidden_act']!r}; only silu (SwiGLU) is supported")
    _false(hf, "attention_bias", "attention biases are not supported")
    _false(hf, "mlp_bias", "MLP biases are not supported")
    if hf.get("partial_rotary_factor", 1.0) not in (None, 1, 1.0):
        raise _refuse("partial_rotary_factor", "is not 1: only full-width RoPE is supported")
    d, heads = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    kv_heads = _int(hf, "num_key_value_heads", heads)
    if heads % kv_heads:
        raise _refuse("num_key_value_heads", f"({kv_heads}) does not divide "
                      f"num_attention_heads ({heads})")  # fmt: skip
    max_len = _int(hf, "max_position_embeddings")
    head_dim = hf.get("head_dim")
    if head_dim is not None and (d % heads != 0 or head_dim != d // heads):
        raise _refuse("head_dim", f"is {head_dim!r}; only hidden_size / num_attention_heads "
                      f"({d / heads:g}) is supported")  # fmt: skip
    if d % heads == 0 and (d // heads) % 2:
        raise _refuse("head_dim", f"(hidden_size / num_attention_heads) is {d // heads}: an odd "
                      "head dim is not supported (RoPE rotates pairs)")  # fmt: skip
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True) and window < max_len:
        raise _refuse("sliding_window", f"is {window!r} (< max_position_embeddings "
                      f"{max_len}): sliding-window attention is not supported")  # fmt: skip
    tie = hf.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise _refuse("tie_word_embeddings", f"must be true or false, got {tie!r}")
    init_std = hf.get("initializer_range")
    try:
        return ModelConfig(
            vocab_size=vocab_size,
            d_model=d,
            n_layers=_int(hf, "num_hidden_layers"),
            n_heads=heads,
            n_kv_heads=kv_heads,
            d_ff=_int(hf, "intermediate_size"),
            max_seq_len=max_len,
            dropout=0.0,
            tie_embeddings=tie,
            rope_theta=_rope_theta(hf),
            norm_eps=_number(hf, "rms_norm_eps", 1e-6),
            init_std=init_std if isinstance(init_std, float) and init_std > 0 else 0.02,
        )
    except ConfigError as e:  # e.g. heads not dividing, an odd head dim
        raise HFFormatError(f"config.json: {e}") from None

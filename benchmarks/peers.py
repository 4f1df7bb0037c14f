"""Shared by the benchmark scripts: the same-shape transformers peer and machine facts."""

from __future__ import annotations

from pathlib import Path


def llama_config(cfg, **extra):
    """A transformers LlamaConfig with exactly our ModelConfig's shape: same vocabulary,
    width, layers, heads (no grouped KV), SwiGLU size, RoPE theta, RMSNorm eps, tying, and
    no biases, so any speed difference is the implementation's, not the model's."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
        **extra,
    )


def cpu_model() -> str | None:
    """The CPU's model name from /proc/cpuinfo (None where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None

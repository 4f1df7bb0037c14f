"""llm-train's LoRA flags: parse, check, adapt the loaded model, merge on save.

The adapters and their checkpoints live in engine.lora; this file only turns flags into a
LoraConfig (its checks give the one-line errors) and calls the engine.
"""

from __future__ import annotations

from .common import UsageError

BASE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def add_lora_flags(g) -> None:
    g.add_argument("--lora-rank", type=int, metavar="R",
                   help="train LoRA adapters of rank R on a frozen --init-from model instead "
                   "of every weight (the checkpoint then holds only the adapters)")  # fmt: skip
    g.add_argument(
        "--lora-alpha",
        type=float,
        metavar="A",
        help="adapter scale alpha (update = alpha/R * B A; default: 2 x rank)",
    )
    g.add_argument(
        "--lora-dropout",
        type=float,
        metavar="P",
        help="dropout on the adapters' input (default: 0)",
    )
    g.add_argument(
        "--lora-targets",
        metavar="LAYERS",
        help="comma-separated layers to adapt: qkv,proj,gate_up,down (default: all)",
    )
    g.add_argument("--base-dtype", choices=tuple(BASE_DTYPES), metavar="{fp32,bf16}",
                   help="hold the frozen weights of the adapted layers in this dtype "
                   "(default: fp32)")  # fmt: skip
    g.add_argument("--merge-on-save", action="store_true",
                   help="when training ends, write a full checkpoint with the adapters merged "
                   "in (not resumable) instead of the adapter checkpoint")  # fmt: skip


def lora_config(args):
    """The LoraConfig the flags ask for, or None (no --lora-rank); UsageError when bad."""
    from tritonlm.engine.lora.lora_config import LoraConfig, LoraConfigError, parse_targets

    given = [f for f in ("lora_alpha", "lora_dropout", "lora_targets", "base_dtype")
             if getattr(args, f) is not None]  # fmt: skip
    if args.lora_rank is None:
        if given or args.merge_on_save:
            flag = "--merge-on-save" if args.merge_on_save else "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} needs --lora-rank")
        return None
    if not args.init_from and not args.resume:
        raise UsageError("--lora-rank adapts a trained model: give --init-from CKPT|HF_DIR")
    fields = {"rank": args.lora_rank}
    if args.lora_alpha is not None:
        fields["alpha"] = args.lora_alpha
    else:
        fields["alpha"] = 2.0 * args.lora_rank
    if args.lora_dropout is not None:
        fields["dropout"] = args.lora_dropout
    if args.lora_targets is not None:
        fields["targets"] = parse_targets(args.lora_targets)
    if args.base_dtype is not None:
        fields["base_dtype"] = BASE_DTYPES[args.base_dtype]
    try:
        return LoraConfig(**fields)
    except LoraConfigError as e:
        message = str(e)  # "rank must be >= 1, got 0", "targets: unknown layer(s) ..."
        field = message.split(" ")[0].rstrip(":")
        raise UsageError(
            f"--lora-{message}".replace(f"--lora-{field}", f"--lora-{field.replace('_', '-')}")
        ) from None


def adapt(args, model, cfg) -> None:
    """Add fresh adapters to the --init-from model (a resume already has its own)."""
    if cfg is None or args.resume:
        return
    from tritonlm.engine.lora.adapter_checkpoint import base_ref
    from tritonlm.engine.lora.layers import add_lora

    add_lora(model, cfg, base_ref(args.init_from), seed=args.seed)


def merge_on_save(args, out, model, tokenizer) -> bool:
    """--merge-on-save: replace the adapter checkpoint in ``out`` by the merged model."""
    from tritonlm.engine.checkpoint.save_load import save_checkpoint
    from tritonlm.engine.lora.layers import lora_info, merge_lora

    info = lora_info(model) if args.merge_on_save else None
    if info is None:
        return False
    lora, base = info
    merge_lora(model)
    save_checkpoint(out, model, tokenizer, {"merged_lora": lora.to_dict(), "base": base.to_dict()})
    return True

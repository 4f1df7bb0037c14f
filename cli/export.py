"""llm-export: write a checkpoint in another program's format.

    llm-export CKPT OUT_DIR                       Hugging Face Llama folder (fp32)
    llm-export CKPT OUT_DIR --dtype bf16 --max-shard-size 2GB
    llm-export CKPT model.gguf --dtype q8_0       GGUF file (llama.cpp)
    llm-export LORA_CKPT OUT_DIR --adapter-only   PEFT LoRA adapter folder

A LoRA adapter checkpoint is exported merged into its base unless --adapter-only.

The format is --format, or gguf when OUT ends with .gguf, else hf. The conversion lives in
the engine (engine.hf_export, engine.gguf_export); this file parses, loads and reports.
Every bad argument or input is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import Parser, UsageError, run_main

PROG = "llm-export"

EPILOG = """\
examples:
  llm-export runs/demo exported/demo                 # transformers: from_pretrained(...)
  llm-export runs/demo exported/demo --dtype bf16 --max-shard-size 500MB
  llm-export runs/demo demo.gguf --dtype q8_0        # llama.cpp
  llm-export runs/demo-lora exported/lora --adapter-only   # peft: PeftModel.from_pretrained
"""


def build_parser() -> Parser:
    p = Parser(prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Export a tritonlm checkpoint as a Hugging Face Llama folder "
               "(config, safetensors, tokenizer, chat template) or as a GGUF file.")  # fmt: skip
    p.add_argument("checkpoint", metavar="CKPT", help="tritonlm checkpoint directory")
    p.add_argument("out", metavar="OUT", help="folder to write (hf) or .gguf file (gguf)")
    p.add_argument(
        "--format",
        choices=("hf", "gguf"),
        default=None,
        help="hf or gguf (default: gguf when OUT ends with .gguf, else hf)",
    )
    p.add_argument("--dtype", default=None,
                   help="weights: fp32|bf16|fp16 for hf (default fp32); "
                   "f32|f16|bf16|q8_0 for gguf (default f16)")  # fmt: skip
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="hf: split the weights into files of at most SIZE (e.g. 500MB, "
                   "2GiB; default 5GB)")  # fmt: skip
    p.add_argument("--adapter-only", action="store_true",
                   help="write only the LoRA adapters of an adapter checkpoint, as a PEFT "
                   "folder (adapter_config.json, adapter_model.safetensors) for our HF export "
                   "of its base")  # fmt: skip
    p.add_argument("--base-name", metavar="NAME",
                   help="--adapter-only: base_model_name_or_path written into "
                   "adapter_config.json (default: none)")  # fmt: skip
    p.add_argument("--force", action="store_true",
                   help="gguf: replace OUT even if it is not a GGUF file")  # fmt: skip
    return p


def _export_adapter(args) -> int:
    from tritonlm.engine.lora.adapter_checkpoint import is_adapter_checkpoint, load_model
    from tritonlm.engine.lora.peft_format import export_peft

    if args.format == "gguf" or args.dtype or args.max_shard_size:
        raise UsageError("--adapter-only writes a PEFT folder: drop --format/--dtype/"
                         "--max-shard-size")  # fmt: skip
    if not is_adapter_checkpoint(args.checkpoint):
        raise UsageError(f"--adapter-only: {args.checkpoint} is not a LoRA adapter checkpoint")
    ckpt = load_model(args.checkpoint, device="cpu", backend="torch", merge=False)
    files = export_peft(ckpt.model, args.out, args.base_name)
    print(f"exported the adapters of {ckpt.path} -> {args.out} (PEFT LoRA, {len(files)} files)")
    return 0


def run(args) -> int:
    from tritonlm.engine.checkpoint.shards import DEFAULT_MAX_SHARD_SIZE
    from tritonlm.engine.interop.hf_export import export_hf, resolve_dtype, resolve_format
    from tritonlm.engine.lora.adapter_checkpoint import load_model
    from tritonlm.engine.sizes import parse_size

    if not args.checkpoint or not args.out:
        raise UsageError("CKPT and OUT must be non-empty paths")
    if args.adapter_only:
        return _export_adapter(args)
    fmt = resolve_format(args.out, args.format)
    dtype = resolve_dtype(fmt, args.dtype)
    if fmt == "gguf" and args.max_shard_size is not None:
        raise UsageError("--max-shard-size applies to --format hf only (GGUF is one file)")
    try:
        shard_bytes = parse_size(args.max_shard_size or DEFAULT_MAX_SHARD_SIZE)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None
    ckpt = load_model(args.checkpoint, device="cpu", backend="torch")  # LoRA: merged
    out = Path(args.out)
    if fmt == "gguf":
        from tritonlm.engine.interop.gguf_export import export_gguf

        export_gguf(ckpt.model, ckpt.tokenizer, out, dtype, force=args.force)
        print(f"exported {ckpt.path} -> {out} (gguf, {dtype})")
        return 0
    files = export_hf(ckpt.model, ckpt.tokenizer, out, dtype, shard_bytes)
    weights = sum(1 for f in files if f.endswith(".safetensors"))
    print(f"exported {ckpt.path} -> {out} (Hugging Face LlamaForCausalLM, {dtype}, "
          f"{weights} weight file{'s' if weights > 1 else ''}, {len(files)} files)")  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

"""llm-import: turn a Hugging Face Llama/Mistral folder into a tritonlm checkpoint.

    llm-import HF_DIR OUT_CKPT       then: llm-chat OUT_CKPT, or llm-train --init-from ...

Anything our model or tokenizer would compute differently (biases, rope scaling, sliding
windows, sentencepiece tokenizers, ...) is refused with one line naming the field; what
the import noticed (e.g. a chat template it could not carry over) is printed.
"""

from __future__ import annotations

import argparse
import sys

from tritonlm.engine.fields import with_flag

from .common import Parser, UsageError, run_main

PROG = "llm-import"

EPILOG = """\
examples:
  llm-import ~/models/SmolLM2-135M runs/smol     # a local folder (config, safetensors, tokenizer)
  llm-chat runs/smol
  llm-import ~/models/SmolLM2-135M runs/smol-tuned --adapter ~/adapters/smol-lora  # + PEFT LoRA
  llm-train --init-from ~/models/SmolLM2-135M --chat-data chats.jsonl --out runs/smol-chat
"""


def build_parser() -> Parser:
    p = Parser(prog=PROG, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
               description="Import a Hugging Face LlamaForCausalLM / MistralForCausalLM "
               "folder with a byte-level BPE tokenizer as a tritonlm checkpoint.")  # fmt: skip
    p.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json, safetensors "
                   "weights (one file or shards) and tokenizer.json")  # fmt: skip
    p.add_argument("out", metavar="OUT_CKPT", help="checkpoint directory to write")
    p.add_argument("--adapter", metavar="PEFT_DIR",
                   help="merge this PEFT LoRA adapter (adapter_config.json + "
                   "adapter_model.safetensors) into the imported weights")  # fmt: skip
    p.add_argument(
        "--force",
        action="store_true",
        help="replace OUT_CKPT if it is a checkpoint (even a resumable run)",
    )
    return p


def run(args) -> int:
    from tritonlm.engine.interop.hf_import import import_hf

    if not args.hf_dir or not args.out:
        raise UsageError("HF_DIR and OUT_CKPT must be non-empty paths")
    if args.adapter:
        from tritonlm.engine.lora.peft_format import import_hf_with_adapter

        imported = import_hf_with_adapter(args.hf_dir, args.adapter, args.out, args.force)
    else:
        imported = import_hf(args.hf_dir, args.out, force=args.force)
    for note in imported.notes:
        print(f"{PROG}: note: {with_flag(note)}", file=sys.stderr)
    cfg = imported.model.config
    print(f"imported {args.hf_dir} -> {args.out} ({imported.model.num_parameters():,} "
          f"parameters, {cfg.n_layers} layers, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads, "
          f"vocab {cfg.vocab_size})")  # fmt: skip
    return 0


def main(argv=None) -> int:
    return run_main(PROG, lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

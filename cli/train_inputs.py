"""llm-train's inputs: the corpus and chats, the tokenizer and model, the token cache.

Split from :mod:`.train` (the run itself); every problem is a UsageError or an engine
error that ``main`` reports as one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from .common import UsageError, naming
from .lora_args import adapt, lora_config


def load_inputs(args, ctx):
    """The pretraining corpus (checked paths, read later as a stream) and the chats."""
    import glob

    from tritonlm.engine.data.corpus import open_corpus
    from tritonlm.engine.data.data_files import DataError
    from tritonlm.engine.data.records import load_chats

    corpus = chats = None
    if args.data:
        paths = []
        for p in args.data:  # a quoted pattern ('shards/*.parquet') is expanded here
            hits = sorted(glob.glob(p, recursive=True)) if glob.has_magic(p) else [p]
            if not hits:
                raise DataError(f"--data {p}: no file matches this pattern")
            paths += hits
        corpus = open_corpus(paths, option="--data", text_field=args.text_field,
                             text_exts=args.text_ext)  # fmt: skip
    if args.chat_data:
        result = load_chats(args.chat_data, option="--chat-data")
        if ctx.is_main and not args.quiet:
            print(f"data: {result.summary('chats')}", flush=True)
        chats = result.items
    return corpus, chats


def _workers(args) -> int:
    """--workers, or the cores shared among the ranks torchrun started on this machine."""
    from tritonlm.engine.worker_pool import default_workers

    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return args.workers or max(1, default_workers() // max(1, local_ranks))


def _check_resume_shape(args, ckpt) -> None:
    """A resume keeps its model and tokenizer: a typed shape or tokenizer flag that differs
    from the checkpoint is refused in one line (the same value, as when the first command
    is repeated with --resume, is fine)."""
    cfg = ckpt.model.config
    for field in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
        typed = getattr(args, field, None)
        if typed is not None and typed != getattr(cfg, field):
            flag = "--" + field.replace("_", "-")
            have = getattr(cfg, field)
            raise UsageError(f"{flag} {typed}: the checkpoint being resumed has {field} "
                             f"{have}; a resume keeps its model's shape")  # fmt: skip
    tok = ckpt.tokenizer  # asked-for size, or the size reached when the merges ran out
    if args.vocab_size and args.vocab_size not in (tok.vocab_size, tok.config.vocab_size):
        raise UsageError(f"--vocab-size {args.vocab_size}: the checkpoint being resumed has "
                         f"{tok.vocab_size} tokens; a resume keeps its tokenizer")  # fmt: skip
    if args.tokenizer:
        from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

        with naming(f"--tokenizer {args.tokenizer}"):
            given = BpeTokenizer.load(args.tokenizer)
        if given.to_dict() != ckpt.tokenizer.to_dict():
            raise UsageError(f"--tokenizer {args.tokenizer}: not the tokenizer of the checkpoint "
                             "being resumed; a resume keeps its tokenizer")  # fmt: skip


def tokenizer_and_model(args, texts, chats, show: bool):
    """The checkpoint resumed or started from (or None), its tokenizer and model; or a new
    tokenizer (given, or trained on a sample of the corpus) and a new model."""
    from tritonlm.engine.lora.adapter_checkpoint import load_model
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig
    from tritonlm.engine.train.run_plan import (
        DEFAULT_VOCAB,
        load_init,
        new_model,
        set_dropout,
        tokenizer_texts,
    )
    from tritonlm.engine.train.trainer_state import check_trainer_state

    if args.resume or args.init_from:
        if args.init_from:  # one of our checkpoints or a Hugging Face folder
            ckpt = load_init(args.init_from, backend=args.backend)
        else:  # an adapter checkpoint resumes with its adapters unmerged
            ckpt = load_model(args.resume, backend=args.backend, merge=False)
        if args.resume and not ckpt.resumable:
            raise UsageError(f"--resume {args.resume}: not a resumable checkpoint")
        if args.resume:  # every field a resume reads, checked before it is used
            check_trainer_state(ckpt.trainer_state, str(ckpt.path))
            _check_resume_shape(args, ckpt)
        if args.seq_len and args.seq_len > ckpt.model.config.max_seq_len:
            raise UsageError(f"--seq-len {args.seq_len} exceeds the checkpoint's max_seq_len "
                             f"{ckpt.model.config.max_seq_len}")  # fmt: skip
        if args.dropout is not None and args.init_from:
            set_dropout(ckpt.model, args.dropout)
        adapt(args, ckpt.model, lora_config(args))  # --lora-rank: freeze, add adapters
        return ckpt, ckpt.tokenizer, ckpt.model
    if args.tokenizer:
        if not Path(args.tokenizer).is_file():  # a FIFO or device would block or never end
            raise UsageError(f"--tokenizer {args.tokenizer}: not a regular file")
        with naming(f"--tokenizer {args.tokenizer}"):
            tokenizer = BpeTokenizer.load(args.tokenizer)
    else:
        vocab = args.vocab_size or DEFAULT_VOCAB[args.preset]
        from tritonlm.cli.byte_progress import ByteBar

        sample = texts.sample(args.tokenizer_sample_bytes) if texts else None
        bar = ByteBar("tokenizer: counting", enabled=show)
        try:
            tokenizer = BpeTokenizer.train(tokenizer_texts(sample, chats),
                                           BpeTokenizerConfig(vocab_size=vocab),
                                           workers=_workers(args), count_progress=bar)  # fmt: skip
        finally:
            bar.close()
    shape = {
        k: getattr(args, k)
        for k in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "dropout")
    }
    overrides = {k: v for k, v in shape.items() if v is not None}
    if args.seq_len:
        overrides["max_seq_len"] = args.seq_len
    return None, tokenizer, new_model(args.preset, tokenizer.vocab_size, overrides, args.seed)


def corpus_cache(args, corpus, tokenizer, cache_dir, ctx):
    """Tokenize the corpus on --workers processes (or reuse its cache), with a bar."""
    from tritonlm.cli.byte_progress import ByteBar
    from tritonlm.engine.data.token_cache import build_corpus_cache

    show = ctx.is_main and not args.quiet
    bar = ByteBar("tokenizing", enabled=show)
    try:
        cache = build_corpus_cache(corpus, tokenizer, cache_dir, bar, _workers(args))
    finally:
        bar.close()
    if show:
        print(f"data: {cache.info.get('summary', f'{cache.n_docs} documents')}", flush=True)
    return cache

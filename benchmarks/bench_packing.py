"""Packed sequences on the CPU: SFT packed vs padded, and pretraining with vs without the
document mask. Prints a table and writes results/bench_packing.json.

SFT (data/chat.json, and a held-out multi-turn chat set written here, `heldout_chats`):
  * useful target tokens per second (assistant tokens trained on) and the padding
    fraction, packed (--pack) vs padded, same model, batch and number of steps;
  * validation loss at equal target tokens: the packed run gets the steps that consume
    as many target tokens as the padded run (packed rows carry more targets per step).
Pretraining (data/pretrain.json): validation loss at equal steps with and without
--doc-mask, each evaluated the way it trained and both with the mask (loss of each
document on its own).

    python benchmarks/bench_packing.py               # seed preset (minutes on a CPU)
    python benchmarks/bench_packing.py --quick       # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "bench_packing.json"

# Our own held-out chat text: topics chat.json does not cover, answers of varied length.
_QA = [
    (
        "How do I water a young tomato plant?",
        "Water the soil, not the leaves, early in the morning. Give it a deep drink two or "
        "three times a week so the roots grow down instead of staying near the top.",
    ),
    (
        "Why does a bicycle chain need oil?",
        "Oil lets the links turn against the gears with less rubbing. A dry chain wears out "
        "fast and makes a squeaking sound.",
    ),
    ("What is a timetable?", "A list of times when trains or buses leave and arrive."),
    ("Can you name three string instruments?", "The violin, the cello and the guitar."),
    (
        "How long should bread dough rise?",
        "Usually until it doubles in size, which takes about one to two hours in a warm "
        "kitchen. A cold room makes it slower, and that is fine: slow dough often tastes "
        "better.",
    ),
    (
        "What does a lighthouse do?",
        "It shines a bright light from the coast so that ships at night know where the rocks "
        "and the harbour are.",
    ),
    (
        "Is a spider an insect?",
        "No. A spider has eight legs and two body parts; an insect has six legs and three "
        "body parts.",
    ),
    (
        "What is compost?",
        "Compost is old plant and food waste that has rotted into dark soil. Gardeners mix it "
        "into beds to feed the plants.",
    ),
    (
        "Why do trains run on rails?",
        "Steel wheels on steel rails roll with very little friction, so one engine can pull "
        "many heavy cars, and the rails steer the train for the driver.",
    ),
    ("How many keys does a piano have?", "A full piano has 88 keys: 52 white and 36 black."),
    (
        "What should I pack for a day hike?",
        "Water, a snack, a warm layer, a rain jacket, a map, and a small first aid kit. Tell "
        "someone where you are going and when you plan to be back.",
    ),
    (
        "What is a tide?",
        "The slow rise and fall of the sea, about twice a day, pulled mostly by the moon.",
    ),
    ("Thanks!", "You are welcome. Ask me anything else."),
    (
        "How do I fix a flat tyre?",
        "Take the wheel off, pull the tyre and tube out, find the hole, patch it or fit a new "
        "tube, then put everything back and pump it to the pressure written on the tyre.",
    ),
    (
        "What is a metronome?",
        "A device that clicks at a steady speed so a musician can keep time while practising.",
    ),
    (
        "Why do leaves change colour in autumn?",
        "The green pigment breaks down as days get shorter and colder, and the yellow and "
        "orange colours that were hidden underneath show through.",
    ),
]


def heldout_chats(n: int = 240, seed: int = 7) -> list[list[dict]]:
    """Conversations of one to six turns drawn from `_QA` (seeded), some with a system
    message: a multi-turn set with a wide spread of lengths."""
    rng = random.Random(seed)
    chats = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.2:
            msgs.append({"role": "system", "content": "You are a patient helper. Answer simply."})
        for q, a in rng.sample(_QA, rng.choice((1, 1, 2, 2, 3, 4, 6))):
            msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        chats.append(msgs)
    return chats


def _model(tok, preset: str):
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig.preset(preset, tok.vocab_size))


def _train(model, tok, cache, out: Path, **cfg) -> dict:
    """One phase on the CPU; train-loop seconds exclude the final evaluation."""
    from tritonlm.engine.train.loop import train
    from tritonlm.engine.train.train_config import TrainConfig

    steps = cfg["steps"]
    config = TrainConfig(eval_every=steps, eval_batches=10**6, seed=0, device="cpu",
                         backend="torch", log_every=steps, **cfg)  # fmt: skip
    res = train(model, tok, cache, config, out)
    last = [r for r in res.history if r.get("step") == res.step][-1]
    return {"steps": res.step, "val_loss": res.val_loss, "train_s": last["elapsed_s"],
            "pad_fraction": res.pad_fraction, "notes": res.notes}  # fmt: skip


def _targets(tok, cache, seq_len: int, batch: int, steps: int, pack: bool) -> int:
    """Target tokens the first `steps` steps train on (the sampler's items, counted)."""
    from tritonlm.engine.train.batches import ChatBatches, EpochSampler

    data = ChatBatches(cache, seq_len, 0.05, 0, tok.pad_id or 0, pack=pack)
    _, items = EpochSampler(data.n_train, 0).items(0, steps * batch)
    return data.counts(items)[0], data


def _val_loss_masked(model, cache, seq_len: int) -> float:
    """Mean loss over the pretraining validation windows, with document ids."""
    import numpy as np
    from tritonlm.engine.train.batches import PretrainWindows

    data = PretrainWindows(cache, seq_len, 0.05, 0, doc_mask=True)
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for lo in range(0, data.n_val, 32):
            bt = data.val_batch(np.arange(lo, min(data.n_val, lo + 32)))
            loss = model.loss(bt.idx, bt.targets, document_ids=bt.document_ids)
            total += float(loss) * bt.n_targets
            count += bt.n_targets
    return total / count


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--preset", default="seed")
    p.add_argument("--pretrain-steps", type=int, default=400)
    p.add_argument("--sft-steps", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=RESULTS)
    p.add_argument("--limit", type=int, default=None, help="first N texts and chats (tests)")
    p.add_argument("--machine-note", default="2 shared cores, loaded by parallel work",
                   help="the load on the machine, recorded in the JSON")  # fmt: skip
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.sft_steps, args.batch = 20, 10, 4
    torch.set_num_threads(args.threads)
    from tritonlm.engine.data import token_cache as tc
    from tritonlm.engine.data.records import load_chats, load_texts
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

    texts = load_texts([ROOT / "data" / "pretrain.json"]).items[: args.limit]
    chats = {"chat.json": load_chats([ROOT / "data" / "chat.json"]).items[: args.limit],
             "heldout (ours)": heldout_chats()[: args.limit]}  # fmt: skip
    sample = texts + [m["content"] for cs in chats.values() for c in cs for m in c]
    tok = BpeTokenizer.train(sample, BpeTokenizerConfig(vocab_size=512))
    report = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpu_threads": args.threads, "platform": platform.platform(),
                          "note": args.machine_note},
              "preset": args.preset, "batch": args.batch, "pretrain": {}, "sft": {}}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pre = tc.build_pretrain_cache(texts, tok, tmp / "cache")
        T = _model(tok, args.preset).config.max_seq_len
        base = None
        for mask in (False, True):
            model = _model(tok, args.preset)
            r = _train(model, tok, pre, tmp / f"pre{mask}", phase="pretrain",
                       steps=args.pretrain_steps, batch_size=args.batch, doc_mask=mask)  # fmt: skip
            r["val_loss_with_doc_mask"] = _val_loss_masked(model, pre, T)
            report["pretrain"]["doc_mask" if mask else "no_mask"] = r
            base = model if mask else base
        for name, convs in chats.items():
            cache = tc.build_chat_cache(convs, tok, tmp / "cache")
            rows = {}
            pad_targets, _ = _targets(tok, cache, T, args.batch, args.sft_steps, False)
            for label, pack, steps in (("padded", False, args.sft_steps),
                                       ("packed", True, args.sft_steps)):  # fmt: skip
                n_targets, _ = _targets(tok, cache, T, args.batch, steps, pack)
                r = _train(copy.deepcopy(base), tok, cache, tmp / f"{name}{label}", phase="sft",
                           steps=steps, batch_size=args.batch, pack=pack)  # fmt: skip
                r["targets"] = n_targets
                r["targets_per_s"] = n_targets / r["train_s"]
                rows[label] = r
            # equal target tokens: the packed steps that consume the padded run's targets
            per_step = rows["packed"]["targets"] / args.sft_steps
            eq = max(1, math.ceil(pad_targets / per_step))
            r = _train(copy.deepcopy(base), tok, cache, tmp / f"{name}eq", phase="sft",
                       steps=eq, batch_size=args.batch, pack=True)  # fmt: skip
            r["targets"] = _targets(tok, cache, T, args.batch, eq, True)[0]
            rows["packed_equal_targets"] = r
            report["sft"][name] = rows
    _print(report)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


def _print(rep: dict) -> None:
    print(f"preset {rep['preset']}, batch {rep['batch']}, CPU ({rep['machine']['note']})")
    print("pretraining                 steps  val loss (own mode)  val loss (doc mask)")
    for k, r in rep["pretrain"].items():
        print(
            f"  {k:24s} {r['steps']:6d} {r['val_loss']:19.4f} {r['val_loss_with_doc_mask']:20.4f}"
        )
    print(
        "SFT                           run        steps  targets  target tok/s  padding  val loss"
    )
    for name, rows in rep["sft"].items():
        for label, r in rows.items():
            tps = r.get("targets_per_s")
            print(f"  {name:28s}{label:22s}{r['steps']:5d} {r['targets']:8d} "
                  f"{'' if tps is None else f'{tps:12.0f}':>12s} {r['pad_fraction']:8.1%} "
                  f"{r['val_loss']:9.4f}")  # fmt: skip
        for note in rows["packed"]["notes"] + rows["padded"]["notes"]:
            print(f"    {name}: {note}")


if __name__ == "__main__":
    sys.exit(main())

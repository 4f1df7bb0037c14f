"""Measure the peak host memory (RSS) of a few real training steps, next to what the plan's
memory model predicts for them; run in a fresh process so the RSS is this run's alone.

    python tests/memory_probe.py PRESET VOCAB BATCH SEQ_LEN [--no-guard]

Prints one JSON object: predicted (bytes by part and peak_bytes, from
engine.train.plan.memory_at, as ``llm-train --plan`` computes them once the model is
built), peak (the process's high-water RSS after the steps).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from tritonlm.engine.model.config import ModelConfig
from tritonlm.engine.model.memory import high_water_rss
from tritonlm.engine.model.transformer import Transformer
from tritonlm.engine.train.batches import Batch
from tritonlm.engine.train.loop import Trainer
from tritonlm.engine.train.plan import memory_at, resident_bytes
from tritonlm.engine.train.train_config import TrainConfig


class RandomTokens:
    """A batch source of seeded random windows (the memory of a step does not depend on
    which tokens it sees)."""

    kind = "pretrain"

    def __init__(self, vocab: int, seq_len: int, n: int = 64):
        self.T, self.vocab, self.n_train, self.n_val = seq_len, vocab, n, 0

    def counts(self, items):
        return len(items) * self.T, len(items) * self.T

    def positions(self, items):
        return len(items) * self.T  # full windows: no padding

    def train_batch(self, epochs, items):
        rng = np.random.default_rng(int(items[0]))
        t = torch.from_numpy(rng.integers(0, self.vocab, (len(items), self.T + 1)))
        return Batch(t[:, :-1].contiguous(), t[:, 1:].contiguous(), None, len(items) * self.T)


def main(argv: list[str]) -> None:
    preset, vocab, batch, seq = argv[0], *map(int, argv[1:4])
    guard = "--no-guard" not in argv
    torch.set_num_threads(1)
    cfg = ModelConfig.preset(preset, vocab, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(cfg)
    config = TrainConfig(steps=3, batch_size=batch, log_every=1, eval_every=0, device="cpu",
                         guard=guard, warmup=1)  # fmt: skip
    cpu = torch.device("cpu")
    predicted = memory_at(cfg, config, cpu, batch, seq, resident_bytes())  # as --plan does
    Trainer(model, RandomTokens(vocab, seq), config).run()
    peak = high_water_rss()
    print(json.dumps({"predicted": predicted, "peak": peak}))


if __name__ == "__main__":
    main(sys.argv[1:])

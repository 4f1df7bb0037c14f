"""LoRA under DDP: llm-train --lora-rank launched with torchrun on the CPU (gloo), 2 ranks x
batch b, gives the per-step losses of 1 process x batch 2b (pretraining and SFT), and rank 0
alone writes one adapter checkpoint that loads in this process."""

from __future__ import annotations

import pytest
import torch
from test_ddp import SHAPE, TRAIN, B, assert_same_losses, losses, torchrun, write_data
from tritonlm.cli.train import main as train_main
from tritonlm.engine.lora.adapter_checkpoint import is_adapter_checkpoint, load_model
from tritonlm.engine.lora.layers import lora_layers

LORA = ["--lora-rank", "4", "--lora-alpha", "8"]  # no dropout: each rank draws its own masks


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_ddp")
    texts, chats = write_data(root / "data")
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = root / "base"
        rc = train_main([*SHAPE, "--data", str(texts), "--out", str(base), "--seq-len", "16",
                         "--batch-size", "2", "--steps", "2", "--eval-every", "0",
                         "--device", "cpu", "--quiet"])  # fmt: skip
        assert rc == 0
        single = root / "single"
        rc = train_main([*TRAIN, *LORA, "--init-from", str(base), "--data", str(texts),
                         "--chat-data", str(chats), "--out", str(single),
                         "--batch-size", str(2 * B)])  # fmt: skip
        assert rc == 0
    finally:
        torch.set_num_threads(old)
    return root, base, texts, chats, single


def test_two_ranks_train_the_same_adapters_as_one_process(setup):
    root, base, texts, chats, single = setup
    out = root / "ddp"
    p = torchrun([*TRAIN, *LORA, "--init-from", str(base), "--data", str(texts),
                  "--chat-data", str(chats), "--out", str(out), "--batch-size", str(B),
                  "--dist-timeout", "120"])  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = losses(single), losses(out)
    assert sorted(got) == sorted(ref) and {k[0] for k in ref} == {"pretrain", "sft"}
    assert_same_losses(got, ref, sorted(ref))
    assert is_adapter_checkpoint(out) and p.stdout.count("checkpoint:") == 1
    ckpt = load_model(out, merge=False)
    assert ckpt.trainer_state["world_size"] == 2 and lora_layers(ckpt.model)
    a = load_model(out).model.state_dict()
    b = load_model(single).model.state_dict()
    for name, t in b.items():
        torch.testing.assert_close(a[name], t, atol=2e-4, rtol=2e-4)

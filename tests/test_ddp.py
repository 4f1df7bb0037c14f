"""Multi-process training (engine/distributed.py + the DDP path of the Trainer / llm-train).

The end-to-end tests launch ``llm-train`` under PyTorch's launcher exactly as a user would
(``python -m torch.distributed.run --nproc_per_node=2 ... llm-train ...``) on the CPU with
the gloo backend and a tiny model, each launch on its own free port:

1. 2 ranks x batch b give the same per-step losses (pretraining and SFT, with gradient
   accumulation) as 1 process x batch 2b, and the same validation losses;
2. only one checkpoint directory is written, by rank 0, and it loads in this process;
3. a rank that exits abruptly makes the whole run exit non-zero; the checkpoint written
   before the crash resumes with 2 ranks onto the uninterrupted run's losses;
4. a rank that hangs makes rank 0 fail with a clear collective-timeout error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from procs import running, saved_step, signal_and_wait, wait_until
from tritonlm.cli.train import main as train_main
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.train import distributed as dd

TEXTS = [
    f"The {a} {b} fox jumps over the {c} dog number {i}. It was a {b} day in town."
    for i, (a, b, c) in enumerate(
        (a, b, c)
        for a in ("quick", "slow", "tiny", "big")
        for b in ("brown", "red", "green")
        for c in ("lazy", "happy", "sleepy", "odd")
    )
]
CHATS = [
    f"User: What is {w}? Assistant: {w.capitalize()} is a word with {len(w)} letters."
    + (" It is short." if len(w) < 5 else "")
    for w in ("apple", "tree", "river", "stone", "cloud", "house", "bread", "music", "sky", "ox")
]
B = 2  # per-rank batch; the single-process reference uses 2 * B
SHAPE = [
    "--preset", "seed", "--d-model", "32", "--n-layers", "1", "--n-heads", "2",
    "--d-ff", "64", "--vocab-size", "300",
]  # fmt: skip
TRAIN = [
    "--seq-len", "16", "--pretrain-steps", "4", "--sft-steps", "3", "--grad-accum", "2",
    "--eval-every", "2", "--eval-batches", "2", "--val-fraction", "0.2",
    "--lr", "3e-3", "--warmup", "1", "--seed", "7", "--pack",  # packed SFT rows
    "--device", "cpu", "--backend", "torch", "--quiet",
]  # fmt: skip
COMMON = SHAPE + TRAIN
LAUNCH_TIMEOUT_S = 300  # hang guard for a whole launch, not a timing assertion


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_data(root: Path) -> tuple[Path, Path]:
    root.mkdir(parents=True, exist_ok=True)
    texts, chats = root / "texts.json", root / "chats.json"
    texts.write_text(json.dumps(TEXTS))
    chats.write_text(json.dumps(CHATS))
    return texts, chats


def llm_train_cmd(fault: str | None = None) -> list[str]:
    """`$(which llm-train)` next to this interpreter; with a fault, the test harness that
    injects it (tests/fault_injection.py) in front of the same main()."""
    if fault:
        return [str(Path(__file__).with_name("fault_injection.py")), fault]
    return [str(Path(sys.executable).parent / "llm-train")]


def torchrun_cmd(args: list[str], nproc: int = 2, fault: str | None = None):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}",
        *llm_train_cmd(fault), *args,
    ]  # fmt: skip
    return cmd, env


def torchrun(args: list[str], nproc: int = 2, fault: str | None = None):
    cmd, env = torchrun_cmd(args, nproc, fault)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def losses(out: Path) -> dict[tuple[str, int], dict]:
    """The last metrics.jsonl record of each (phase, step)."""
    recs = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[(r["phase"], r["step"])] = r
    return recs


def assert_same_losses(got: dict, ref: dict, keys) -> None:
    for key in keys:
        for name in ("loss", "val_loss", "grad_norm"):
            if name in ref[key] or name in got[key]:
                a, b = got[key][name], ref[key][name]
                assert a == pytest.approx(b, rel=2e-4, abs=1e-5), (key, name, a, b)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("ddp_data"))


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, data):
    """1 process, batch 2b (in this process)."""
    texts, chats = data
    out = tmp_path_factory.mktemp("single") / "run"
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = train_main(
            [*COMMON, "--data", str(texts), "--chat-data", str(chats), "--out", str(out),
             "--batch-size", str(2 * B)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, data):
    """2 ranks, batch b each."""
    texts, chats = data
    root = tmp_path_factory.mktemp("ddp")
    out = root / "run"
    p = torchrun(
        [*COMMON, "--data", str(texts), "--chat-data", str(chats), "--out", str(out),
         "--batch-size", str(B), "--dist-timeout", "120"]
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return root, out, p


# ----------------------------------------------------------------------------- unit tests


def test_torchrun_env_parsing():
    assert dd.torchrun_env({}) is None
    env = dd.torchrun_env(
        {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
         "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    )  # fmt: skip
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (3, 4, 1, 2)
    assert (env.master_addr, env.master_port) == ("10.0.0.1", 29500)
    with pytest.raises(dd.DistributedError, match="RANK=4"):
        dd.torchrun_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(dd.DistributedError, match="not an integer"):
        dd.torchrun_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(dd.DistributedError, match="WORLD_SIZE"):
        dd.torchrun_env({"RANK": "0"})


def test_single_process_context_is_trivial():
    ctx = dd.init_distributed("cpu", 5, environ={})
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.is_distributed) == (0, 1, True, False)
    # WORLD_SIZE=1 under torchrun: still no process group
    one = dd.init_distributed("cpu", 5, environ={"RANK": "0", "WORLD_SIZE": "1"})
    assert not one.is_distributed and one.backend is None
    assert ctx.all_reduce_sum([1, 2.5]) == [1.0, 2.5]
    assert ctx.all_reduce_mean(3.0) == 3.0
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(ctx.all_reduce_mean(t), t)
    assert ctx.broadcast_flag(True) is True and ctx.broadcast_flag(False) is False
    assert ctx.broadcast_bytes(b"abc") == b"abc"
    assert ctx.all_gather_bytes(b"xy") == [b"xy"]
    ctx.check_same("anything", "value")
    ctx.barrier()
    ctx.close()
    with pytest.raises(dd.DistributedError, match="timeout"):
        dd.init_distributed("cpu", 0, environ={})


# ----------------------------------------------------------------------------- end to end


def test_two_ranks_match_one_process_and_write_one_checkpoint(single_run, ddp_run, data, tmp_path):
    """(1) 2 ranks x batch b == 1 process x batch 2b, step by step; (2) one checkpoint."""
    root, out, p = ddp_run
    ref, got = losses(single_run), losses(out)
    keys = sorted(ref)
    assert sorted(got) == keys
    assert {k[0] for k in keys} == {"pretrain", "sft"}
    assert sum("val_loss" in ref[k] for k in keys) >= 3  # evaluation averaged over ranks
    assert_same_losses(got, ref, keys)
    last = ("sft", 3)
    assert got[last]["tokens_seen"] == ref[last]["tokens_seen"]  # counted over all ranks

    # only rank 0 wrote, and only the one checkpoint directory (no stray temporaries)
    assert sorted(x.name for x in root.iterdir()) == [".cache", "run"]
    assert p.stdout.count("checkpoint:") == 1  # one summary, from rank 0
    ckpt = load_checkpoint(out)  # in this single process; strict weight names
    assert ckpt.resumable and ckpt.trainer_state["world_size"] == 2
    assert ckpt.trainer_state["phase"] == "sft" and ckpt.trainer_state["step"] == 3
    assert len(ckpt.trainer_state["rng_ranks"]) == 2
    assert not any(k.startswith("module.") for k in ckpt.model.state_dict())
    assert torch.isfinite(ckpt.model(torch.tensor([[1, 2, 3]]))).all()
    # model-only use in a single process: --init-from
    rc = train_main(
        ["--init-from", str(out), "--data", str(data[0]),
         "--out", str(tmp_path / "x"), "--batch-size", "2", "--steps", "1",
         "--eval-every", "0", "--device", "cpu", "--quiet"]
    )  # fmt: skip
    assert rc == 0


def test_dead_rank_fails_the_run_and_the_checkpoint_resumes(single_run, data, tmp_path, capsys):
    """(3) a rank exiting abruptly fails the run; its last checkpoint resumes with 2 ranks
    onto the uninterrupted losses (those of the single process with batch 2b)."""
    texts, chats = data
    out = tmp_path / "run"
    data_args = ["--data", str(texts), "--chat-data", str(chats), "--batch-size", str(B)]
    args = [*COMMON, *data_args, "--out", str(out), "--dist-timeout", "60"]
    p = torchrun(args, fault="exit:1:3")  # rank 1 leaves abruptly during pretrain step 3
    assert p.returncode != 0, p.stderr[-3000:]
    ckpt = load_checkpoint(out)
    assert ckpt.trainer_state["phase"] == "pretrain" and ckpt.trainer_state["step"] == 2
    del ckpt
    # a checkpoint saved by 2 ranks does not resume in 1 process (clear error, exit 2)
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    capsys.readouterr()
    rc = train_main([*TRAIN, *data_args, "--resume", str(copy), "--out", str(copy)])
    err = capsys.readouterr().err
    assert rc == 2 and "saved with 2 processes" in err, err
    p = torchrun([*TRAIN, *data_args, "--resume", str(out), "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    ref, got = losses(single_run), losses(out)
    assert sorted(got) == sorted(ref)
    assert_same_losses(got, ref, [k for k in ref if k != ("pretrain", 1)])


def test_hung_rank_times_out_with_a_clear_error(data, tmp_path):
    texts, chats = data
    out = tmp_path / "run"
    p = torchrun(
        [*COMMON, "--data", str(texts), "--chat-data", str(chats), "--out", str(out),
         "--batch-size", str(B),
         "--eval-every", "0", "--pretrain-steps", "6", "--dist-timeout", "15",
         "--log-every", "1"],
        fault="hang:1:2",  # rank 1 never gets the batches of the third step
    )  # fmt: skip
    assert p.returncode != 0
    assert "llm-train: error: rank 0 of 2" in p.stderr, p.stderr[-3000:]
    assert "--dist-timeout" in p.stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 2 in steps and max(steps) <= 3  # it failed after the hang, not during setup


def test_ctrl_c_under_torchrun_saves_or_keeps_the_last_checkpoint(data, tmp_path):
    """SIGINT to the launcher: it forwards the signal to every worker; they agree on the
    next step boundary and save together (or, if the launcher's patience runs out, the
    previous checkpoint stays intact). Either way the run directory resumes."""
    import signal

    texts, _ = data
    out = tmp_path / "run"
    args = [*SHAPE, "--seq-len", "16", "--batch-size", str(B), "--device", "cpu", "--quiet",
            "--data", str(texts), "--out", str(out), "--steps", "100000", "--eval-every", "0",
            "--save-every", "3", "--log-every", "1", "--dist-timeout", "60"]  # fmt: skip
    cmd, env = torchrun_cmd(args)
    seen = [-1]  # the last checkpoint step seen before the Ctrl-C
    with running(cmd, env=env) as proc:
        wait_until(proc, lambda: seen.append(saved_step(out)) or seen[-1] >= 3, poll=0.2)
        err = signal_and_wait(proc, signal.SIGINT)
    saved = seen[-1]
    assert proc.returncode != 0
    assert "llm-train: error" not in err  # (the launcher itself prints its own traceback)
    state = load_checkpoint(out).trainer_state  # complete, whichever save was last
    assert state["world_size"] == 2 and state["step"] >= saved
    assert "interrupted at pretrain step" in err  # rank 0 finished its interrupt save
    logged = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert state["step"] == logged[-1]


def test_guard_every_rank_skips_the_same_step(data, tmp_path, monkeypatch):
    """A NaN in one gradient of rank 1 only: both ranks skip that update (the all-reduced
    gradient norm is the same everywhere), and the run matches one process that meets the
    same fault."""
    from fault_injection import inject

    texts, chats = data
    args = [*COMMON, "--data", str(texts), "--chat-data", str(chats), "--dist-timeout", "120"]
    p = torchrun([*args, "--out", str(tmp_path / "ddp"), "--batch-size", str(B)],
                 fault="nangrad:2:1")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    inject("nangrad:2", monkeypatch.setattr)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = train_main([*args, "--out", str(tmp_path / "one"), "--batch-size", str(2 * B)])
    finally:
        torch.set_num_threads(old)
    assert rc == 0
    got, ref = losses(tmp_path / "ddp"), losses(tmp_path / "one")
    skips = [k for k, r in got.items() if r.get("event") == "guard_skip"]
    # the fault is keyed by data step: it meets step 3 of each phase
    assert skips == [("pretrain", 3), ("sft", 3)] == [k for k, r in ref.items() if r.get("event")]
    steps = [k for k, r in ref.items() if "event" not in r]
    assert_same_losses({k: got[k] for k in steps if "event" not in got[k]}, ref, steps)

"""Decisions a training run makes before its first step, testable without a command line.

run directory check --> phases to run (a resume skips finished ones) --> each phase's
TrainConfig (a resumed phase keeps its saved schedule) --> tokenizer and model
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.checkpoint_store import resolve
from ..errors import SettingError
from ..model.config import ModelConfig
from ..model.memory import build_bytes, step_bytes, too_big
from ..model.transformer import Transformer
from .train_config import PHASES, TrainConfig, TrainingError

DEFAULT_VOCAB = {"seed": 512, "small": 4096, "gpt2": 8192}
DEFAULT_STEPS = {"pretrain": 1000, "sft": 300}
# What a resumed run may change (where and how it runs, not what it learns).
RUNTIME_FIELDS = ("device", "backend", "dtype", "compile", "log_every", "max_shard_size")
DATA_FIELD = {"pretrain": "data", "sft": "chat_data"}  # the run option holding its data


def is_checkpoint(path: Path) -> bool:
    """A tritonlm checkpoint is at ``path`` (or its fallback copy beside it)."""
    root = resolve(Path(path))
    if root is None:
        return False
    try:
        cfg = json.loads((root / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and cfg.get("format") == "tritonlm-checkpoint"


RUN_LOG_FILES = ("metrics.jsonl", "loss_pretrain.png", "loss_sft.png")


def check_run_dir(out: str | Path) -> Path:
    """The run directory must be new, empty or an earlier tritonlm run (never someone's
    unrelated files: a save replaces the directory). An earlier run may have been cut off
    before its first save completed: only a run log in ``out``, and possibly the complete
    fallback copy ``.<out>.old`` beside it."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"out {out}: exists and is not a directory", field="out")
    only_log = out.is_dir() and all(p.name in RUN_LOG_FILES for p in out.iterdir())
    if out.is_dir() and not only_log and not is_checkpoint(out):
        raise TrainingError(
            f"out {out}: directory is not empty and not a tritonlm checkpoint; "
            "choose a new or empty directory",
            field="out",
        )
    return out


def plan_phases(available: list[str], resume_state: dict | None,
                steps: dict[str, int] | None = None) -> list[str]:  # fmt: skip
    """Phases still to run, in order. ``available``: phases with data. A resumed run starts
    at its saved phase, or after it when that phase had finished; ``steps[phase]``, a new
    step count asked for, extends a finished phase (see :func:`resumed_config`)."""
    phases = [p for p in PHASES if p in available]
    if resume_state is None:
        return phases
    saved = resume_state.get("phase")
    if saved not in phases:
        field = DATA_FIELD.get(saved, "data")
        raise TrainingError(f"the checkpoint is in phase {saved!r}; give its data (`{field}`)")
    at = resume_state.get("step", 0)
    total = (steps or {}).get(saved) or resume_state.get("total_steps", 0)
    if total < at:
        raise TrainingError(f"steps {total}: the {saved} phase being resumed is already at "
                            f"step {at}", field="steps")  # fmt: skip
    finished = at >= total
    return phases[phases.index(saved) + (1 if finished else 0) :]


def phase_config(phase: str, values: dict[str, Any], *, steps: int | None = None,
                 epochs: float | None = None, lr: float | None = None,
                 resumed: dict | None = None) -> TrainConfig:  # fmt: skip
    """The TrainConfig of one phase.

    ``values``: TrainConfig fields the user set for every phase (batch size, runtime, ...).
    ``steps`` / ``epochs``: this phase's length (default: DEFAULT_STEPS). ``lr``: this
    phase's peak lr, when it differs. ``resumed``: the saved config of a phase being
    resumed, which keeps its schedule; only the runtime fields (device, backend, dtype,
    compile, log_every, max_shard_size) may change.
    """
    runtime = {k: values[k] for k in RUNTIME_FIELDS if k in values}
    if resumed is not None:
        return TrainConfig.from_dict({**resumed, **runtime})
    if steps is None and epochs is None:
        steps = DEFAULT_STEPS[phase]
    fields = {**values, "phase": phase, "steps": steps, "epochs": epochs}
    if lr is not None:
        fields["lr"] = lr
    return TrainConfig.from_dict(fields)


def resumed_config(resumed: dict, asked: dict[str, Any], at_step: int) -> tuple[TrainConfig, str]:
    """The config of a phase being resumed, and a note ("" when nothing changed but the
    runtime). ``asked``: the TrainConfig fields the user typed for this phase.

    The saved schedule is kept, except: runtime fields take the new values, and a new
    ``steps`` extends or shortens the run (its learning-rate schedule then ends at the new
    step, which the note says). Any other field that differs from the saved run cannot be
    honoured and is refused (SettingError naming the field), never silently ignored.
    """
    saved = TrainConfig.from_dict(resumed)
    changes = {k: v for k, v in asked.items() if k in RUNTIME_FIELDS}
    note = ""
    for k, v in asked.items():
        if k in RUNTIME_FIELDS or v == getattr(saved, k):
            continue
        if k == "steps" and saved.epochs is None and v >= at_step:
            changes["steps"] = v
            note = (f"the run was planned for {saved.steps} steps and is at step {at_step}; "
                    f"it now {'ends' if v > saved.steps else 'stops early'} at step {v}, its "
                    "learning-rate schedule rescaled to match")  # fmt: skip
            continue
        if k == "steps" and saved.epochs is None:
            raise SettingError(f"steps {v}: the run being resumed is already at step {at_step}",
                               field=k)  # fmt: skip
        what = f"its {k} ({getattr(saved, k)!r})" if k != "steps" else "its epochs"
        raise SettingError(f"{k} {v}: a resumed run keeps {what}; only steps and the "
                           f"runtime settings ({', '.join(RUNTIME_FIELDS)}) may change",
                           field=k)  # fmt: skip
    return saved.replace(**changes), note


def tokenizer_texts(texts: Iterable[str] | None, chats: Iterable[list] | None) -> Iterator[str]:
    """Everything a new tokenizer learns from: documents, then every chat message."""
    yield from texts or ()
    for chat in chats or ():
        for msg in chat:
            yield msg["content"]


def new_model(preset: str, vocab_size: int, overrides: dict[str, Any], seed: int) -> Transformer:
    """A freshly initialized model of a preset's shape (seeded, so runs are repeatable)."""
    cfg = ModelConfig.preset(preset, vocab_size, **overrides)
    reason = too_big(build_bytes(cfg), torch.device("cpu"))
    if reason:
        raise TrainingError(f"building this model {reason}; choose a smaller shape")
    torch.manual_seed(seed)
    return Transformer(cfg)


def _is_hf_folder(path: Path) -> bool:
    """A Hugging Face model folder: a config.json naming a model type or architecture, and
    none of our checkpoint's marks (a damaged checkpoint must get the checkpoint's error)."""
    root = resolve(path)
    if root is None or is_checkpoint(path) or (root / "manifest.json").exists():
        return False
    try:
        cfg = json.loads((root / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(cfg, dict) and ("architectures" in cfg or "model_type" in cfg)


def load_init(path: str | Path, backend: str = "auto"):
    """The model and tokenizer ``--init-from`` starts from: one of our checkpoints, or a
    Hugging Face Llama/Mistral folder (imported in memory: its tokenizer comes along, none
    is trained). Returns a Checkpoint either way."""
    from tritonlm.engine.checkpoint.checkpoint_files import FORMAT_VERSION
    from tritonlm.engine.checkpoint.save_load import Checkpoint
    from tritonlm.engine.lora.adapter_checkpoint import load_model

    path = Path(path)
    if not _is_hf_folder(path):  # a LoRA checkpoint comes merged into its base
        return load_model(path, backend=backend)  # names what is wrong, if anything
    from ..interop.hf_import import load_hf

    imported = load_hf(path, backend=backend)
    model = imported.model
    return Checkpoint(path=path, model=model, tokenizer=imported.tokenizer,
                      model_config=model.config, train_config=None, trainer_state=None,
                      format_version=FORMAT_VERSION)  # fmt: skip


def set_dropout(model: Transformer, p: float) -> None:
    """Change the dropout of a loaded model (fine-tuning with a different regularization)."""
    model.config = model.config.replace(dropout=p)
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = p


def check_memory(cfg: ModelConfig, batch_size: int, seq_len: int, device: torch.device) -> None:
    """Fail fast, in one line, when a step cannot fit in the memory this machine has."""
    reason = too_big(step_bytes(cfg, batch_size, seq_len), device)
    if reason:
        raise TrainingError(
            f"a training step of batch {batch_size} x {seq_len} tokens {reason}; lower "
            "`batch_size` or `seq_len` (or use `grad_accum` for the same global batch)"
        )

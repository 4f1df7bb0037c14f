"""What every command line shares: which errors are one line (and which are bugs), the
config-field-to-flag wording, and one --device/--backend reading for every command."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import torch
import tritonlm.engine
from factories import run_cli
from tritonlm.cli import chat, evaluate, serve, train_flags
from tritonlm.cli.common import UsageError, run_main
from tritonlm.cli.device import resolve_device
from tritonlm.engine.data.data_files import DataError
from tritonlm.engine.errors import EngineError
from tritonlm.engine.inference.sampling import SamplingConfig
from tritonlm.kernels.dispatch import BACKENDS

# ----------------------------------------------------------------------------- errors


def body_raising(error):
    def body():
        raise error

    return body


def test_engine_errors_are_one_line_and_name_the_flag(capsys):
    assert run_main("prog", body_raising(DataError("x.json: line 3: not JSON"))) == 2
    assert capsys.readouterr().err == "prog: error: x.json: line 3: not JSON\n"
    with pytest.raises(EngineError) as e:
        SamplingConfig(max_new_tokens=0)
    assert e.value.field == "max_new_tokens"
    assert run_main("prog", body_raising(e.value)) == 2
    assert capsys.readouterr().err.startswith("prog: error: --max-new-tokens must be >= 1")


@pytest.mark.parametrize("bug", [ValueError("bad slice"), OSError(5, "Input/output error"),
                                 KeyError("k")])  # fmt: skip
def test_a_bug_keeps_its_traceback(bug, capsys):
    """Only UsageError and EngineError are user errors: anything else is not disguised."""
    with pytest.raises(type(bug)):
        run_main("prog", body_raising(bug))
    assert capsys.readouterr().err == ""


def test_every_engine_error_class_derives_from_engine_error():
    """A new error type that forgets the base would turn a user error into a traceback."""
    found = []
    for info in pkgutil.walk_packages(tritonlm.engine.__path__, "tritonlm.engine."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Exception) and obj.__module__ == info.name:
                found.append(obj)
    flow_control = {"QueueFull"}  # the server answers 503 itself; never printed
    missing = [c.__name__ for c in found if not issubclass(c, EngineError)]
    assert len(found) > 15 and sorted(set(missing) - flow_control) == []


# ----------------------------------------------------------------------------- devices


@pytest.mark.parametrize("parser", [chat.build_parser, serve.build_parser,
                                    evaluate.build_parser, train_flags.build_parser])  # fmt: skip
def test_every_command_takes_the_kernel_backends(parser):
    p = parser()
    args, _ = p.parse_known_args(["ckpt", "--backend", BACKENDS[-1], "--device", "cpu"])
    assert args.backend == BACKENDS[-1] and args.device == "cpu"
    with pytest.raises(UsageError, match="invalid choice"):
        p.parse_known_args(["ckpt", "--backend", "numpy"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU machine")
def test_llm_eval_takes_cuda_n_and_says_why_it_cannot(tmp_path, capsys):
    rc, out, err = run_cli(evaluate.main, capsys, tmp_path / "ckpt", "--data", tmp_path / "d",
                           "--device", "cuda:1")  # fmt: skip
    assert rc == 2 and out == "" and err.count("\n") == 1
    assert "--device cuda:1: CUDA is not available" in err  # not "invalid choice"


@pytest.mark.parametrize("name, words", [("meta", "unsupported device"), ("gpu", "unknown device"),
                                         ("cpu:3", "one cpu device")])  # fmt: skip
def test_device_resolver_refusals(name, words):
    with pytest.raises(UsageError, match=words):
        resolve_device(name)
    assert resolve_device("cpu") == torch.device("cpu")


# ----------------------------------------------------------------------------- flags


def test_llm_chat_sampling_flags_are_sampling_configs_fields():
    import dataclasses

    fields = [f for f in dataclasses.fields(SamplingConfig) if f.metadata.get("flag")]
    args = chat.build_parser().parse_args(["ckpt"])
    assert len(fields) >= 9 and all(getattr(args, f.name) == f.default for f in fields)
    assert chat.sampling_from_args(args) == SamplingConfig()
    with pytest.raises(UsageError, match=r"--top-p: must be > 0, got 0"):  # the field's rule
        chat.build_parser().parse_args(["ckpt", "--top-p", "0"])

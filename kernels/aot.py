"""Ahead-of-time builds of our Triton kernels for real GPU targets, without a GPU.

The interpreter (TRITON_INTERPRET=1) accepts programs a GPU compiler rejects (e.g. `tl.dot`
on tiles smaller than 16), so the build gate compiles every kernel, with the block sizes
its launchers really use, to PTX and a cubin for sm_80 / sm_90::

    triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))

Each kernel module exposes ``aot_specs(dtype) -> list[AotSpec]`` (:mod:`.aot_spec`, which
this module re-exports: ``aot.AotSpec``).

Under TRITON_INTERPRET=1, ``@triton.jit`` yields an InterpretedFunction that
``triton.compile`` cannot take. Rather than rebuilding JIT functions by hand (fragile when
kernels call other jitted helpers), compiles then run in one fresh Python subprocess with
TRITON_INTERPRET unset, which re-imports each kernel by module and name and sends back
PTX, cubin and metadata as JSON. Without the interpreter the compile runs in-process.

Resource usage (registers, spills) comes from ``cuobjdump --dump-resource-usage`` on the
cubin (the bundled tool, else CUDA's), falling back to ``ptxas -v`` on the PTX; shared
memory comes from Triton's own metadata.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import attention, cross_entropy, rmsnorm
from .aot_spec import AotSpec

# AotSpec is re-exported: callers describe builds as ``aot.AotSpec(...)``.
__all__ = [
    "TARGET_CCS", "AotSpec", "AotResult", "AotBuildError", "compile_specs",
    "compile_spec", "resource_usage", "kernel_modules",
]  # fmt: skip

TARGET_CCS = (80, 90)


@dataclass
class AotResult:
    """A finished build for one target."""

    name: str
    cc: int
    ptx: str
    cubin: bytes
    shared: int
    num_warps: int
    num_stages: int


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _fn_location(fn: Any) -> tuple[str, str]:
    """(module, name) of a module-level jitted kernel."""
    py = getattr(fn, "fn", fn)
    return py.__module__, py.__name__


def _pointer_alignment(spec: dict) -> dict:
    """The divisibility hints the JIT attaches to a real launch on our benchmark shapes.

    Pointers: torch storage is always at least 16-byte aligned. Integer ``stride_*``
    arguments: row strides of contiguous tensors with hidden sizes, head dims x heads and
    vocabularies that are multiples of 16 (768..4096, 32000, 128256). Without hints the
    compiler must assume the worst (scalar loads, more registers, spills a real launch
    never has). Sizes (rows, T, n_cols) get no hint. A launch whose strides are not
    multiples of 16 (e.g. V = 50257) compiles a hint-free variant at run time.
    """
    hinted = {}
    for i, (name, ty) in enumerate(spec["signature"].items()):
        if ty.startswith("*") or (name.startswith("stride") and ty.startswith("i")):
            hinted[(i,)] = [["tt.divisibility", 16]]
    return hinted


def _compile_in_process(spec_fn: Any, spec: dict, cc: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(
        spec_fn, dict(spec["signature"]), dict(spec["constexprs"]), _pointer_alignment(spec)
    )
    options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]}
    compiled = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
    cubin = compiled.asm.get("cubin")
    if not cubin:
        raise RuntimeError(f"{spec['name']}: compile for sm_{cc} produced no cubin")
    return AotResult(
        name=spec["name"],
        cc=cc,
        ptx=compiled.asm["ptx"],
        cubin=bytes(cubin),
        shared=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        num_stages=int(compiled.metadata.num_stages),
    )


def _spec_to_json(spec: AotSpec) -> dict:
    module, name = _fn_location(spec.fn)
    return {
        "name": spec.name,
        "module": module,
        "fn": name,
        "signature": spec.signature,
        "constexprs": spec.constexprs,
        "num_warps": spec.num_warps,
        "num_stages": spec.num_stages,
    }


def _worker(request_path: str) -> None:
    """Subprocess entry: compile every (spec, cc) in the request; print JSON results."""
    import importlib

    request = json.loads(Path(request_path).read_text())
    out = []
    for job in request["jobs"]:
        spec, cc = job["spec"], job["cc"]
        try:
            fn = getattr(importlib.import_module(spec["module"]), spec["fn"])
            r = _compile_in_process(fn, spec, cc)
            out.append({"ok": True, "name": r.name, "cc": r.cc, "ptx": r.ptx,
                        "cubin": base64.b64encode(r.cubin).decode("ascii"), "shared": r.shared,
                        "num_warps": r.num_warps, "num_stages": r.num_stages})  # fmt: skip
        except Exception as exc:  # reported back to the parent, which raises
            out.append({"ok": False, "name": spec["name"], "cc": cc,
                        "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
    Path(request["output"]).write_text(json.dumps(out))


class AotBuildError(RuntimeError):
    """A kernel failed to compile for a GPU target."""


def compile_specs(specs: list[AotSpec], ccs=TARGET_CCS) -> list[AotResult]:
    """Compile every spec for every compute capability; raise AotBuildError listing all
    failures. Runs in one subprocess (no TRITON_INTERPRET) when the interpreter is on."""
    jobs = [(spec, cc) for spec in specs for cc in ccs]
    if not _interpreting():
        results, errors = [], []
        for spec, cc in jobs:
            try:
                results.append(_compile_in_process(spec.fn, _spec_to_json(spec), cc))
            except Exception as exc:
                errors.append(f"{spec.name} sm_{cc}: {type(exc).__name__}: {exc}")
        if errors:
            raise AotBuildError("kernel build failed:\n" + "\n".join(errors))
        return results
    with tempfile.TemporaryDirectory(prefix="tritonlm_aot_") as tmp:
        request = Path(tmp, "request.json")
        output = Path(tmp, "output.json")
        request.write_text(json.dumps({
            "output": str(output),
            "jobs": [{"spec": _spec_to_json(s), "cc": cc} for s, cc in jobs],
        }))  # fmt: skip
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        # The child must import every kernel module the parent can (tests/ dirs included).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        proc = subprocess.run(
            [sys.executable, "-c", f"from {__name__} import _worker; _worker({str(request)!r})"],
            env=env,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0 or not output.exists():
            raise AotBuildError(f"AOT compile subprocess failed (rc={proc.returncode}):\n"
                                f"{proc.stderr[-4000:]}")  # fmt: skip
        raw = json.loads(output.read_text())
    errors = [f"{r['name']} sm_{r['cc']}: {r['error']}" for r in raw if not r["ok"]]
    if errors:
        raise AotBuildError("kernel build failed:\n" + "\n".join(errors))
    return [
        AotResult(
            r["name"],
            r["cc"],
            r["ptx"],
            base64.b64decode(r["cubin"]),
            r["shared"],
            r["num_warps"],
            r["num_stages"],
        )  # fmt: skip
        for r in raw
    ]


def compile_spec(spec: AotSpec, cc: int) -> AotResult:
    """Compile one spec for one compute capability (see :func:`compile_specs`)."""
    return compile_specs([spec], (cc,))[0]


# -------------------------------------------------------------------------- resources


def _tools(name: str) -> list[str]:
    """Executables called `name`: Triton's bundled one(s) first, then CUDA's, then PATH."""
    found = []
    try:
        import triton

        bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
        found += [bundled / f"{name}-blackwell", bundled / name]  # newest PTX support first
    except ImportError:  # pragma: no cover
        pass
    found += [Path("/usr/local/cuda-13.0/bin") / name, Path("/usr/local/cuda/bin") / name]
    on_path = shutil.which(name)
    if on_path:
        found.append(Path(on_path))
    out = []
    for c in found:
        if c.is_file() and os.access(c, os.X_OK) and str(c) not in out:
            out.append(str(c))
    return out


_CUOBJDUMP_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", re.IGNORECASE)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


_USAGE: dict[tuple[int, str], dict[str, Any]] = {}  # (cc, PTX) -> resource_usage


def resource_usage(result: AotResult) -> dict[str, Any]:
    """Registers per thread, spill bytes and shared memory bytes of a build (remembered
    per target and PTX: each call runs ptxas, a whole second compile).

    Returns {"shared", "num_warps", "registers", "local", "spill_stores", "spill_loads",
    "ptxas"} (keys whose tool is missing are absent).
    Registers and local memory come from cuobjdump on the cubin itself; spill store/load
    bytes from `ptxas -v` on the PTX for the same arch (the cubin has no spill counters).
    """
    key = (result.cc, result.ptx)
    if key not in _USAGE:
        _USAGE[key] = _measure_usage(result)
    return dict(_USAGE[key])


def _measure_usage(result: AotResult) -> dict[str, Any]:
    usage: dict[str, Any] = {"shared": result.shared, "num_warps": result.num_warps}
    with tempfile.TemporaryDirectory(prefix="tritonlm_res_") as tmp:
        cubin = Path(tmp, "k.cubin")
        cubin.write_bytes(result.cubin)
        for cuobjdump in _tools("cuobjdump")[:1]:
            proc = subprocess.run([cuobjdump, "--dump-resource-usage", str(cubin)],
                                  capture_output=True, text=True)  # fmt: skip
            m = _CUOBJDUMP_RE.search(proc.stdout)
            if m:
                usage["registers"] = int(m.group(1))
                usage["local"] = int(m.group(4))
        ptx = Path(tmp, "k.ptx")
        ptx.write_text(result.ptx)
        for ptxas in _tools("ptxas"):  # an older ptxas may reject the PTX version: try next
            arch = f"sm_{result.cc}a" if result.cc >= 90 else f"sm_{result.cc}"
            proc = subprocess.run(
                [ptxas, f"-arch={arch}", "-v", str(ptx), "-o", str(Path(tmp, "p.cubin"))],
                capture_output=True,
                text=True,
            )
            text = proc.stdout + proc.stderr
            regs, spills = _PTXAS_REGS.search(text), _PTXAS_SPILLS.search(text)
            if proc.returncode != 0 or not regs:
                continue
            usage.setdefault("registers", int(regs.group(1)))
            usage["spill_stores"] = int(spills.group(1)) if spills else 0
            usage["spill_loads"] = int(spills.group(2)) if spills else 0
            usage["ptxas"] = Path(ptxas).name
            break
    return usage


def kernel_modules() -> dict[str, Any]:
    """The kernel modules, by short name; each exposes ``aot_specs(dtype)``."""
    return {"rmsnorm": rmsnorm, "cross_entropy": cross_entropy, "attention": attention}

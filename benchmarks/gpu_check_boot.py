"""Make ``import tritonlm`` work from a bare checkout, installing nothing.

The device machine has torch, triton and transformers but no package index and no install
of this project. pyproject.toml maps ``tritonlm.kernels`` -> ``kernels/`` (and so on);
when the package is not importable, this registers the same mapping in ``sys.modules``
from that table, so the scripts import exactly the modules an installed copy would.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Wheels of same-run peers (Liger-Kernel), fetched by `make gpu-check-prep` on a machine
# with a package index and carried along (gitignored): the device machine reaches none.
PEER_WHEELS = ROOT / "benchmarks" / "peer_wheels"
PEER_HINT = ("run `make gpu-check-prep` where a package index is reachable and carry "
             "benchmarks/peer_wheels/ to the GPU machine")  # fmt: skip


def _package_dirs() -> dict[str, str]:
    """pyproject's [tool.setuptools] package-dir, in an order that imports cleanly."""
    try:
        import tomllib  # Python 3.11+
    except ImportError:  # pragma: no cover - 3.10: the layout is fixed, use it directly
        return {"tritonlm.kernels": "kernels", "tritonlm.engine": "engine", "tritonlm.cli": "cli"}
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dirs = table["tool"]["setuptools"]["package-dir"]
    order = ["tritonlm.kernels", "tritonlm.engine", "tritonlm.cli"]  # kernels <- engine <- cli
    names = [n for n in order if n in dirs] + [n for n in dirs if n not in order]
    return {name: dirs[name] for name in names}


def register_from_checkout() -> None:
    """Register tritonlm and its subpackages from this checkout (replacing nothing present)."""
    parent = sys.modules.get("tritonlm")
    if parent is None:
        parent = types.ModuleType("tritonlm")
        parent.__path__ = []  # a package with no files of its own
        sys.modules["tritonlm"] = parent
    dirs = _package_dirs()
    modules = []
    for name, folder in dirs.items():  # every subpackage is findable before any runs
        path = ROOT / folder
        spec = importlib.util.spec_from_file_location(
            name, path / "__init__.py", submodule_search_locations=[str(path)]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        setattr(parent, name.rsplit(".", 1)[1], module)
        modules.append((spec, module))
    for spec, module in modules:
        spec.loader.exec_module(module)


def ensure_importable() -> str:
    """Import tritonlm as installed, else from the checkout; return how it was found."""
    for extra in (ROOT / "tests", ROOT / "benchmarks"):  # kernel_checks, peers
        if str(extra) not in sys.path:
            sys.path.append(str(extra))
    if importlib.util.find_spec("tritonlm") is not None:
        return "installed"
    register_from_checkout()
    return "checkout"


def add_peer_wheels(folder: Path = PEER_WHEELS) -> list[str]:
    """Unpack each ``*.whl`` in `folder` (a wheel is a zip of importable files) into
    ``folder/_unpacked/<wheel name>/`` once and put that on sys.path; return the wheel
    names added. Installs nothing anywhere else."""
    import zipfile

    added = []
    for wheel in sorted(folder.glob("*.whl")):
        target = folder / "_unpacked" / wheel.stem
        if not (target / ".done").exists():
            with zipfile.ZipFile(wheel) as zf:
                zf.extractall(target)
            (target / ".done").write_text(wheel.name)
        if str(target) not in sys.path:
            sys.path.append(str(target))
        added.append(wheel.name)
    return added


def peer_status(module: str, wheel_prefix: str, folder: Path = PEER_WHEELS) -> str:
    """One line on an optional peer: where it came from, or why it is missing."""
    if importlib.util.find_spec(module) is None:
        shown = folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder
        return f"missing: no {wheel_prefix} wheel in {shown}/ and none installed; {PEER_HINT}"
    wheels = sorted(folder.glob(f"{wheel_prefix}-*.whl"))
    return f"present ({wheels[-1].name})" if wheels else "present (installed)"

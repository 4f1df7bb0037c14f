"""Per kernel and GPU target: registers, spills and shared memory of the AOT builds.

Compiles every kernel module's ``aot_specs(dtype)`` (the block sizes the launchers use)
for sm_80 and sm_90 without a GPU (see tritonlm.kernels.aot), then prints a table and
writes JSON to benchmarks/results/kernel_report.json.

    python benchmarks/kernel_report.py
    python benchmarks/kernel_report.py --dtypes bf16 --ccs 90
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tritonlm.kernels import aot

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
RESULTS = Path(__file__).resolve().parent / "results" / "kernel_report.json"


def collect(dtypes: list[str], ccs: list[int]) -> list[dict]:
    jobs, specs = [], []
    for mod_name, mod in aot.kernel_modules().items():
        for dt in dtypes:
            for spec in mod.aot_specs(DTYPES[dt]):
                jobs.append((mod_name, dt, spec))
                specs.append(spec)
    results = aot.compile_specs(specs, tuple(ccs))
    rows = []
    for i, (mod_name, dt, spec) in enumerate(jobs):
        for j, _ in enumerate(ccs):
            r = results[i * len(ccs) + j]
            usage = aot.resource_usage(r)
            rows.append({"module": mod_name, "kernel": spec.name, "dtype": dt,
                         "target": f"sm_{r.cc}", "num_warps": r.num_warps,
                         "num_stages": r.num_stages, "registers": usage.get("registers"),
                         "spill_stores": usage.get("spill_stores"),
                         "spill_loads": usage.get("spill_loads"),
                         "local_bytes": usage.get("local"), "shared_bytes": r.shared,
                         "constexprs": spec.constexprs})  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    cols = ["kernel", "dtype", "target", "num_warps", "registers", "spill_stores",
            "spill_loads", "shared_bytes"]  # fmt: skip
    cells = [["" if r[c] is None else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="fp16,bf16", help="comma-separated: fp16,bf16,fp32")
    parser.add_argument("--ccs", default="80,90", help="comma-separated compute capabilities")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        parser.error(f"--dtypes must be from {', '.join(DTYPES)}")
    try:
        ccs = [int(c) for c in args.ccs.split(",") if c.strip()]
    except ValueError:
        parser.error("--ccs must be integers such as 80,90")
    try:
        rows = collect(dtypes, ccs)
    except aot.AotBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    info = {"triton": __import__("triton").__version__, "torch": torch.__version__}
    args.out.write_text(json.dumps({"versions": info, "kernels": rows}, indent=2) + "\n")
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

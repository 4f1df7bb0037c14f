"""Opt-in autotune: measure every point of the sweep space and write a new config table.

    python benchmarks/autotune_kernels.py                      # on a GPU: this arch's entries
    python benchmarks/autotune_kernels.py --out /tmp/t.json    # write elsewhere
    TRITON_INTERPRET=1 python benchmarks/autotune_kernels.py --quick   # CPU: the code runs

For each op (RMSNorm forward and backward per hidden-size class, cross-entropy over large
vocabularies, the fused linear cross-entropy's chunk budget) and each dtype, every config
of ``kernels/configs.py``'s SWEEP_SPACE is first checked against the torch reference (a
wrong config is dropped, never chosen), then timed (triton.testing.do_bench, median);
the fastest becomes that (arch, op, dtype, shape class) entry. Attention (fp16/bf16): the
forward, packed forward, dk/dv and dq tiles per head-dim class at B*H = 64, T = 4096
(`--ops attention` alone takes minutes: every point is a new kernel build). The table is
the only thing launchers read at run time, so the search never happens during training.
The existing table's other archs are kept; this arch's entries of the tuned ops are
replaced. Every sweep config is built ahead of time by tests/test_kernel_build.py (RMSNorm
and cross-entropy for sm_80/sm_90, attention for sm_90), so whatever this picks compiles
without register spills. On the CPU (the interpreter) the timings mean nothing: `--quick`
only proves the script runs, and writes to benchmarks/results/ by default.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_check_boot  # noqa: E402

gpu_check_boot.ensure_importable()

import torch  # noqa: E402
from gpu_check_speed import bench_ms  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402
from tritonlm.kernels import attention as attn  # noqa: E402
from tritonlm.kernels import attention_configs as attn_cfg  # noqa: E402
from tritonlm.kernels import configs, launch  # noqa: E402
from tritonlm.kernels import cross_entropy as ce  # noqa: E402
from tritonlm.kernels import rmsnorm as rms  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OPS = ("rmsnorm", "cross_entropy", "attention")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    return bool(torch.allclose(a.float(), b.float(), atol=tol, rtol=tol))


def _fastest(timings: list[dict], what: str) -> dict:
    good = [t for t in timings if t["ok"]]
    if not good:
        raise RuntimeError(f"{what}: no config of the sweep matched the reference")
    return min(good, key=lambda t: t["ms"])


def tune_rmsnorm(rows: int, hidden: int, dtype: torch.dtype, device: str) -> dict:
    """{"fwd": (class, best cfg, timings), "bwd": ...} for one hidden size."""
    g = torch.Generator(device=device).manual_seed(hidden)
    x = torch.randn(rows, hidden, device=device, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, device=device, generator=g)).to(dtype)
    dy = torch.randn(rows, hidden, device=device, generator=g).to(dtype)
    ref_y = rms.rms_norm_reference(x, w, 1e-6)
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    rms.rms_norm_reference(xr, wr, 1e-6).backward(dy.float())
    block_n, one_pass = rms.block_config(hidden)
    cls = configs.rmsnorm_class(block_n, one_pass)
    base = {"block_n": block_n, "one_pass": one_pass}
    out = {}
    _, rstd = rms.run_forward(x, w, 1e-6, {**base, "block_m": 1, "num_warps": 4})
    for direction in ("fwd", "bwd"):
        timings = []
        for point in configs.sweep(f"rmsnorm_{direction}", block_n):
            cfg = {**base, **point}
            if direction == "fwd":
                run = lambda cfg=cfg: rms.run_forward(x, w, 1e-6, cfg)  # noqa: E731
                ok = _close(run()[0], ref_y, dtype)
            else:
                run = lambda cfg=cfg: rms.run_backward(dy, x, w, rstd, cfg)  # noqa: E731
                dx, dw = run()
                ok = _close(dx, xr.grad, dtype) and _close(dw, wr.grad, dtype)
            timings.append({**point, "ok": ok, "ms": bench_ms(run) if ok else None})
        best = _fastest(timings, f"rmsnorm_{direction} d{hidden}")
        out[direction] = (cls, {k: best[k] for k in configs.SWEEP_SPACE[f"rmsnorm_{direction}"]},
                          timings)  # fmt: skip
    return out


def tune_cross_entropy(rows: int, vocabs: list[int], dtype: torch.dtype, device: str) -> tuple:
    """(best cfg for the "large" class by total time over `vocabs`, timings)."""
    cases = []
    for vocab in vocabs:
        g = torch.Generator(device=device).manual_seed(vocab)
        logits = (torch.randn(rows, vocab, device=device, generator=g) * 2).to(dtype)
        targets = torch.randint(0, vocab, (rows,), device=device, generator=g)
        ref = ce.cross_entropy_reference(logits, targets)
        cases.append((logits, targets, ref))
    timings = []
    for point in configs.sweep("cross_entropy"):
        total, ok = 0.0, True
        for logits, targets, ref in cases:
            n_valid = ce.count_valid(targets, -100)

            def run(point=point, logits=logits, targets=targets, n_valid=n_valid):
                return ce.cross_entropy_rows(logits, targets, -100, n_valid, None, point)

            ok = ok and _close(run().sum() / n_valid, ref, torch.float32)
            total += bench_ms(run) if ok else 0.0
        timings.append({**point, "ok": ok, "ms": total if ok else None})
    best = _fastest(timings, "cross_entropy")
    return {k: best[k] for k in configs.SWEEP_SPACE["cross_entropy"]}, timings


def tune_linear_ce(n: int, d: int, vocab: int, dtype: torch.dtype, device: str) -> tuple:
    """(best chunk budget by fwd+bwd time, timings) at one (N, d, V)."""
    g = torch.Generator(device=device).manual_seed(vocab)
    h = torch.randn(n, d, device=device, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, device=device, generator=g) * d**-0.5).to(dtype).requires_grad_()
    t = torch.randint(0, vocab, (n,), device=device, generator=g)
    timings = []
    for point in configs.sweep("linear_cross_entropy"):
        rows = ce.chunk_rows(n, vocab, point["chunk_elements"], point["min_chunk_rows"])

        def run(rows=rows):
            ce.linear_cross_entropy_triton(h, w, t, chunk_size=rows).backward()

        timings.append({**point, "chunk_rows": rows, "ok": True,
                        "ms": bench_ms(run, grad_to_none=[h, w])})  # fmt: skip
    best = min(timings, key=lambda r: r["ms"])
    return {k: best[k] for k in configs.SWEEP_SPACE["linear_cross_entropy"]}, timings


def _attention_ok(run, refs: tuple, fwd: bool, dtype: torch.dtype) -> bool:
    """Whether one attention point matches the fp32 reference: the output of a forward
    run, dq/dk/dv of a backward run (`refs` = out, dq, dk, dv)."""
    if fwd:
        return _close(run()[0], refs[0], dtype)
    return all(_close(a, b, dtype) for a, b in zip(run(), refs[1:], strict=True))


def tune_attention(shape: tuple, dtype: torch.dtype, device: str, limit: int | None) -> list:
    """One record {op, class, best, best_ms, shipped_ms, timings} per attention op at one
    (B, H, T, D), causal, multi-head; the packed forward on rows of 512-token documents.
    Each backward point varies one kernel (dk/dv or dq) with the other at the table's
    tiles, and times the whole backward; shipped_ms is the table's own tiles."""
    B, H, T, D = shape
    g = torch.Generator(device=device).manual_seed(D)
    q, k, v, do = (torch.randn(B, H, T, D, device=device, generator=g).to(dtype)
                   for _ in range(4))  # fmt: skip
    ids = (torch.arange(T, device=device) // 512).expand(B, T)
    start, _ = attn.document_bounds(ids)
    arch = launch.arch(q.device)
    base = attn_cfg.attention_config(D, dtype, arch=arch)
    packed_fwd = attn_cfg.attention_config(D, dtype, docs=True, arch=arch).fwd
    # fp32 references: (out, dq, dk, dv) of plain rows; the packed rows' output only
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k, v))
    out = attn.attention_reference(qr, kr, vr)
    out.backward(do.float())
    packed_ref = attn.attention_reference(q.float(), k.float(), v.float(), document_ids=ids)
    refs = {False: (out.detach(), qr.grad, kr.grad, vr.grad), True: (packed_ref,)}
    out, lse = attn.run_forward(q, k, v, None, None, None, base.fwd)

    def shipped_ms(op: str) -> float:
        """The same op with the tiles the table gave before this run (the baseline)."""
        if op == "attention_fwd_docs":
            return bench_ms(lambda: attn.run_forward(q, k, v, None, None, start, packed_fwd))
        if op == "attention_fwd":
            return bench_ms(lambda: attn.run_forward(q, k, v, None, None, None, base.fwd))
        return bench_ms(lambda: attn.run_backward(do, q, k, v, out, lse, None, None, None,
                                                  None, base))  # fmt: skip

    results = []
    for op in attn_cfg.OPS:
        docs = op.endswith("_docs")
        ds = start if docs else None
        timings = []
        for point in configs.sweep(op, attn_cfg.block_d(D))[:limit]:
            tiles = attn_cfg.KernelConfig.of(point)
            fwd = op.startswith("attention_fwd")
            if fwd:
                run = lambda t=tiles, ds=ds: attn.run_forward(q, k, v, None, None, ds, t)  # noqa: E731
            else:
                cfg = replace(base, **{op.removeprefix("attention_"): tiles})
                run = lambda c=cfg: attn.run_backward(do, q, k, v, out, lse, None, None,  # noqa: E731
                                                      None, None, c)  # fmt: skip
            try:
                ok = _attention_ok(run, refs[docs], fwd, dtype)
            except OutOfResources as exc:  # over this GPU's shared memory (an A100's 163 KiB)
                timings.append({**point, "ok": False, "ms": None, "error": str(exc)[:200]})
                continue
            timings.append({**point, "ok": ok, "ms": bench_ms(run) if ok else None})
        best = _fastest(timings, f"{op} d{D}")
        results.append({"op": op, "class": attn_cfg.attention_class(D),
                        "best": {key: best[key] for key in configs.SWEEP_SPACE[op]},
                        "best_ms": best["ms"], "shipped_ms": shipped_ms(op),
                        "timings": timings})  # fmt: skip
    return results


def tune_and_use(quick: bool, out_dir: Path) -> dict:
    """gpu_check --autotune: tune the attention tiles (bf16; quick: fp16, one point per
    op in the interpreter), write this arch's table to `out_dir`, and make it the table
    the rest of the process launches with. Returns the check's row."""
    arch = launch.arch(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    table_out, timings = out_dir / f"kernel_configs_{arch}.json", out_dir / f"autotune_{arch}.json"
    argv = ["--ops", "attention", "--out", str(table_out), "--json", str(timings)]
    argv += ["--quick", "--dtypes", "fp16", "--limit", "1"] if quick else ["--dtypes", "bf16"]
    if main(argv) != 0:
        raise RuntimeError("autotune_kernels failed (see its output above)")
    configs.use_table(table_out)
    ops = [{k: r[k] for k in ("op", "dtype", "class", "best", "best_ms", "shipped_ms")}
           for r in json.loads(timings.read_text())["ops"]]  # fmt: skip
    speedups = [r["shipped_ms"] / r["best_ms"] for r in ops]
    return {"table": str(table_out), "ops": ops, "best_speedup": max(speedups),
            "worst_speedup": min(speedups)}  # fmt: skip


def merge(table: dict, arch: str, entries: list[tuple[str, str, str, dict]]) -> dict:
    """A copy of `table` whose `arch` holds exactly `entries` (op, dtype, class, cfg) for
    the ops they name; the arch's other ops (not tuned in this run) are kept."""
    out = {k: v for k, v in table.items() if k != arch}
    tuned = {op for op, *_ in entries}
    mine: dict = {op: v for op, v in table.get(arch, {}).items() if op not in tuned}
    for op, dt, cls, cfg in entries:
        mine.setdefault(op, {}).setdefault(dt, {})[cls] = dict(cfg)
    out[arch] = mine
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (the interpreter)")
    p.add_argument("--dtypes", default="bf16", help="comma list of bf16,fp16,fp32")
    p.add_argument("--out", default=None, help="table to write (default: the shipped table "
                   "on CUDA, benchmarks/results/kernel_configs_<arch>.json otherwise)")  # fmt: skip
    p.add_argument("--json", default=None, help="all timings (default: benchmarks/results/"
                   "autotune_<arch>.json)")  # fmt: skip
    p.add_argument("--ops", default=",".join(OPS), help=f"comma list of {', '.join(OPS)} "
                   "(default: all)")  # fmt: skip
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="time only the first N attention points per op (smoke runs)")  # fmt: skip
    args = p.parse_args(argv)
    bad = set(args.dtypes.split(",")) - set(DTYPES)
    if bad:
        p.error(f"unknown dtype(s) {', '.join(sorted(bad))}; choose from bf16, fp16, fp32")
    bad = set(args.ops.split(",")) - set(OPS)
    if bad:
        p.error(f"unknown op(s) {', '.join(sorted(bad))}; choose from {', '.join(OPS)}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit {args.limit}: give 1 or more")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.quick:
        print("autotune_kernels: no CUDA device; timings here would mean nothing "
              "(use --quick to smoke-test the script)", file=sys.stderr)  # fmt: skip
        return 2
    device = "cuda" if cuda else "cpu"
    arch = launch.arch(torch.device(device))
    if args.quick:
        hidden, rows, vocabs, lce = [20, 100], 8, [300], (16, 32, 300)
        attention_shapes = [(1, 1, 40, 32)]
    else:
        hidden, rows, vocabs, lce = [768, 2048, 4096, 8192, 12288], 16384, [32000, 128256], (
            8192, 2048, 128256)  # fmt: skip
        # B*H = 64 fills an H100
        attention_shapes = [(4, 16, 4096, D) for D in attn_cfg.SWEEP_HEAD_DIMS]
    ops = args.ops.split(",")
    entries, report = [], {"arch": arch, "device": device, "quick": args.quick, "ops": []}
    t0 = time.perf_counter()
    for dt_name in args.dtypes.split(","):
        dtype = DTYPES[dt_name]
        if "attention" in ops and dtype != torch.float32:  # fp32 tiles stay reasoned (ieee dots)
            for shape in attention_shapes:
                for rec in tune_attention(shape, dtype, device, args.limit):
                    entries.append((rec["op"], dt_name, rec["class"], rec["best"]))
                    report["ops"].append({**rec, "dtype": dt_name, "shape": shape})
                    print(f"{rec['op']} {dt_name} {rec['class']}: {rec['best']} "
                          f"{rec['best_ms']:.3f} ms (shipped tiles {rec['shipped_ms']:.3f} ms)",
                          flush=True)  # fmt: skip
        for d in hidden if "rmsnorm" in ops else []:
            for direction, (cls, cfg, timings) in tune_rmsnorm(rows, d, dtype, device).items():
                entries.append((f"rmsnorm_{direction}", dt_name, cls, cfg))
                report["ops"].append({"op": f"rmsnorm_{direction}", "dtype": dt_name, "d": d,
                                      "class": cls, "best": cfg, "timings": timings})  # fmt: skip
                print(f"rmsnorm_{direction} {dt_name} d{d} ({cls}): {cfg}", flush=True)
        if "cross_entropy" not in ops:
            continue
        cfg, timings = tune_cross_entropy(rows // 2 or 1, vocabs, dtype, device)
        entries.append(("cross_entropy", dt_name, "large", cfg))
        report["ops"].append({"op": "cross_entropy", "dtype": dt_name, "class": "large",
                              "vocabs": vocabs, "best": cfg, "timings": timings})  # fmt: skip
        print(f"cross_entropy {dt_name} large: {cfg}", flush=True)
        if dtype != torch.float32:
            cfg, timings = tune_linear_ce(*lce, dtype, device)
            entries.append(("linear_cross_entropy", dt_name, "any", cfg))
            report["ops"].append({"op": "linear_cross_entropy", "dtype": dt_name,
                                  "shape": lce, "best": cfg, "timings": timings})  # fmt: skip
            print(f"linear_cross_entropy {dt_name}: {cfg}", flush=True)
    report["seconds"] = time.perf_counter() - t0
    default_out = configs.TABLE_PATH if cuda else HERE / "results" / f"kernel_configs_{arch}.json"
    out = Path(args.out) if args.out else default_out
    table = merge(configs.table(), arch, entries)
    table[f"_{arch}_measured"] = (f"by benchmarks/autotune_kernels.py on "
                                  f"{time.strftime('%Y-%m-%d')}, dtypes {args.dtypes}")  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    timings_path = Path(args.json) if args.json else HERE / "results" / f"autotune_{arch}.json"
    timings_path.write_text(json.dumps(report, indent=1, default=str) + "\n")
    print(f"table written to {out}; timings in {timings_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

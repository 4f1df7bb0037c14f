"""Benchmark our Triton kernels against torch eager, torch.compile and (attention) SDPA flash.

On CUDA (bf16, forward + backward, median of triton.testing.do_bench after warmup):
  RMSNorm          N=16384 rows, d in {768, 2048, 4096}            -> ms, GB/s
  linear + CE      N=16384, V in {32000, 50257, 128256}, d in {768, 2048} -> ms, TFLOP/s,
                   peak memory above the inputs (torch.cuda.max_memory_allocated)
  cross-entropy    N=16384 logits rows, same V (kernel alone)       -> ms, GB/s
  attention        B=8, H=12, T in {512, 1024, 2048, 4096}, D in {64, 128} -> ms, TFLOP/s,
                   plus grouped-query (Hkv=4, D=64) and head dim 96 (baselines expand k, v
                   with repeat_interleave, as Hugging Face's eager Llama does)
  and the measured device copy bandwidth, for the RMSNorm >= 80% goal.

Without CUDA (CPU mode): the torch reference path at small shapes (so the script itself is
exercised), plus the fused linear cross-entropy peak-memory comparison at N=16384,
V=32000, d=768 (fp32): the unfused reference vs the same chunked algorithm with the CE step
in torch ops, each in a fresh subprocess, peak RSS (VmHWM) minus RSS after the inputs
were allocated. GPU timings need a GPU; CPU mode says so in its output.

    python benchmarks/bench_kernels.py            # full run
    python benchmarks/bench_kernels.py --quick    # one shape per op, fewer repetitions
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from tritonlm.engine.model.memory import high_water_rss
from tritonlm.kernels import attention as attn_mod
from tritonlm.kernels import cross_entropy as ce_mod
from tritonlm.kernels import rmsnorm as rms_mod

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ATTENTION_IMPLS = ("triton", "sdpa flash", "eager", "torch.compile")


# ----------------------------------------------------------------------------- helpers


def _versions() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = f"CPU ({platform.processor() or platform.machine()})"
    return info


def _repeat_kv(q, k, v):
    """k, v with one head per query head (repeat_interleave of grouped kv heads)."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)


def _attention_eager(q, k, v):
    """Plain-torch causal attention (matmul, mask, softmax, matmul): the eager baseline."""
    k, v = _repeat_kv(q, k, v)
    t = q.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    mask = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def _fwd_bwd(fn, inputs, grad=None):
    """A closure running fn(*inputs) forward + backward."""

    def run():
        out = fn(*inputs)
        out.backward(grad if grad is not None else torch.ones_like(out))

    return run


def _bench_cuda(run, leaves, quick):
    import triton.testing

    for leaf in leaves:
        leaf.grad = None
    return triton.testing.do_bench(
        run, warmup=10 if quick else 25, rep=30 if quick else 100, grad_to_none=leaves,
        return_mode="median",
    )  # fmt: skip


def _peak_cuda(run, leaves) -> int:
    """Peak bytes allocated while `run` executes, above what was allocated before."""
    for leaf in leaves:
        leaf.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for leaf in leaves:
        leaf.grad = None
    return peak


def _compiled(fn):
    return torch.compile(fn, dynamic=False)


def _copy_bandwidth_gbs() -> float:
    x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    import triton.testing

    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() / ms / 1e6


# ---------------------------------------------------------------------------- GPU mode


def gpu_rmsnorm(quick: bool) -> list[dict]:
    rows, dtype = 16384, torch.bfloat16
    variants = {
        "triton": rms_mod.rms_norm_triton,
        "eager": rms_mod.rms_norm_reference,
        "torch.compile": _compiled(rms_mod.rms_norm_reference),
    }
    out = []
    for d in (768, 2048, 4096)[: 1 if quick else 3]:
        x = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
        w = torch.randn(d, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        moved = 5 * rows * d * x.element_size()  # fwd: x in, y out; bwd: dy, x in, dx out
        for name, fn in variants.items():
            ms = _bench_cuda(_fwd_bwd(fn, (x, w), dy), [x, w], quick)
            out.append({"op": "rmsnorm", "impl": name, "shape": f"N={rows} d={d}", "ms": ms,
                        "GB/s": moved / ms / 1e6})  # fmt: skip
    return out


def gpu_cross_entropy(quick: bool) -> list[dict]:
    rows, dtype = 16384, torch.bfloat16
    out = []
    for vocab in (32000, 50257, 128256)[: 1 if quick else 3]:
        targets = torch.randint(0, vocab, (rows,), device="cuda")
        targets[::50] = -100
        # The kernel alone on given logits (read twice + grad written; backward scales it).
        logits = torch.randn(rows, vocab, device="cuda", dtype=dtype, requires_grad=True)
        moved = 5 * rows * vocab * logits.element_size()
        ce_variants = {
            "triton": lambda x, t: ce_mod.cross_entropy_triton(x, t),
            "eager": ce_mod.cross_entropy_reference,
            "torch.compile": _compiled(ce_mod.cross_entropy_reference),
        }
        for name, fn in ce_variants.items():
            run = _fwd_bwd(fn, (logits, targets))
            ms = _bench_cuda(run, [logits], quick)
            out.append({"op": "cross_entropy", "impl": name, "shape": f"N={rows} V={vocab}",
                        "ms": ms, "GB/s": moved / ms / 1e6,
                        "peak_MiB": _peak_cuda(run, [logits]) / 2**20})  # fmt: skip
        del logits
        for d in (768, 2048)[: 1 if quick else 2]:
            hidden = torch.randn(rows, d, device="cuda", dtype=dtype, requires_grad=True)
            weight = (torch.randn(vocab, d, device="cuda", dtype=dtype) * d**-0.5).requires_grad_()
            flops = 6 * rows * vocab * d
            lin_variants = {
                "triton fused": ce_mod.linear_cross_entropy_triton,
                "eager": ce_mod.linear_cross_entropy_reference,
                "torch.compile": _compiled(ce_mod.linear_cross_entropy_reference),
            }
            for name, fn in lin_variants.items():
                run = _fwd_bwd(fn, (hidden, weight, targets))
                ms = _bench_cuda(run, [hidden, weight], quick)
                out.append({"op": "linear_cross_entropy", "impl": name,
                            "shape": f"N={rows} V={vocab} d={d}", "ms": ms,
                            "TFLOP/s": flops / ms / 1e9,
                            "peak_MiB": _peak_cuda(run, [hidden, weight]) / 2**20})  # fmt: skip
            del hidden, weight
            torch.cuda.empty_cache()
    return out


def gpu_attention(quick: bool, impls: list[str] | None = None) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    batch, heads, dtype = 8, 12, torch.bfloat16

    def sdpa_flash(q, k, v):
        k, v = _repeat_kv(q, k, v)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    variants = {
        "triton": lambda q, k, v: attn_mod.attention_triton(q, k, v),
        "sdpa flash": sdpa_flash,
        "eager": _attention_eager,
        "torch.compile": _compiled(_attention_eager),
    }
    if impls:  # main checked the names against ATTENTION_IMPLS
        variants = {name: fn for name, fn in variants.items() if name in impls}
    out = []
    # (kv heads, head dim): multi-head 64 and 128, grouped-query (3 query heads per kv
    # head), head dim 96 (tiles padded to 128 columns)
    for kv_heads, d in ((heads, 64), (heads, 128), (4, 64), (heads, 96))[: 1 if quick else 4]:
        for t in (512, 1024, 2048, 4096)[: 1 if quick else 4]:
            q = torch.randn(batch, heads, t, d, device="cuda", dtype=dtype, requires_grad=True)
            k, v = (torch.randn(batch, kv_heads, t, d, device="cuda", dtype=dtype,
                                requires_grad=True) for _ in range(2))  # fmt: skip
            flops = 3.5 * 4 * batch * heads * t * t * d * 0.5  # causal; bwd = 2.5 x fwd
            shape = f"B={batch} H={heads}" + (f" Hkv={kv_heads}" if kv_heads != heads else "")
            for name, fn in variants.items():
                ms = _bench_cuda(_fwd_bwd(fn, (q, k, v)), [q, k, v], quick)
                out.append({"op": "attention", "impl": name, "shape": f"{shape} T={t} D={d}",
                            "ms": ms, "TFLOP/s": flops / ms / 1e9})  # fmt: skip
    return out


# ---------------------------------------------------------------------------- CPU mode


def _median_seconds(run, reps: int) -> float:
    run()  # warmup
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cpu_reference(quick: bool) -> list[dict]:
    """Reference (torch) path at small shapes, fp32, forward + backward."""
    reps = 3 if quick else 10
    torch.manual_seed(0)
    out = []
    x = torch.randn(1024, 768, requires_grad=True)
    w = torch.randn(768, requires_grad=True)
    s = _median_seconds(_fwd_bwd(rms_mod.rms_norm_reference, (x, w)), reps)
    out.append({"op": "rmsnorm", "impl": "reference (CPU)", "shape": "N=1024 d=768",
                "ms": s * 1e3, "GB/s": 5 * x.numel() * 4 / s / 1e9})  # fmt: skip
    logits = torch.randn(512, 8192, requires_grad=True)
    targets = torch.randint(0, 8192, (512,))
    s = _median_seconds(_fwd_bwd(ce_mod.cross_entropy_reference, (logits, targets)), reps)
    out.append({"op": "cross_entropy", "impl": "reference (CPU)", "shape": "N=512 V=8192",
                "ms": s * 1e3, "GB/s": 5 * logits.numel() * 4 / s / 1e9})  # fmt: skip
    q, k, v = (torch.randn(1, 4, 256, 64, requires_grad=True) for _ in range(3))
    s = _median_seconds(_fwd_bwd(attn_mod.attention_reference, (q, k, v)), reps)
    flops = 3.5 * 4 * 4 * 256 * 256 * 64 * 0.5
    out.append({"op": "attention", "impl": "reference (CPU)", "shape": "B=1 H=4 T=256 D=64",
                "ms": s * 1e3, "TFLOP/s": flops / s / 1e12})  # fmt: skip
    return out


def _memory_child(variant: str, rows: int, vocab: int, dim: int) -> None:
    """Run in a fresh process: print JSON with the peak RSS growth of one fwd+bwd."""
    torch.manual_seed(0)
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (rows,))
    fn = {
        "reference": ce_mod.linear_cross_entropy_reference,
        "chunked": ce_mod.linear_cross_entropy_chunked_torch,
    }[variant]
    fn(hidden[:8], weight[:64], targets[:8] % 64).backward()  # load code paths, tiny
    hidden.grad = weight.grad = None
    base = high_water_rss()
    t0 = time.perf_counter()
    loss = fn(hidden, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = high_water_rss()
    print(json.dumps({"variant": variant, "peak_growth_MiB": (peak - base) / 2**20,
                      "seconds": seconds, "loss": loss.item()}))  # fmt: skip


def cpu_linear_ce_memory(rows: int, vocab: int, dim: int) -> list[dict]:
    """Peak memory of the unfused reference vs the chunked algorithm (torch CE step)."""
    f32 = 4
    chunk = ce_mod.default_chunk_rows(rows, vocab, torch.float32, torch.device("cpu"))
    analytic = {
        # logits, their log-softmax and the logits' gradient coexist in the backward
        "reference": 3 * rows * vocab * f32,
        # one chunk's logits (+ exp temp) and the fp32 grad_weight accumulator + grad_hidden
        "chunked": 2 * chunk * vocab * f32 + 2 * vocab * dim * f32 + rows * dim * f32,
    }
    out = []
    for variant in ("reference", "chunked"):
        proc = subprocess.run(
            [sys.executable, __file__, "--memory-child", variant, str(rows), str(vocab), str(dim)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        out.append({"op": "linear_cross_entropy", "impl": f"{variant} (CPU, torch ops)",
                    "shape": f"N={rows} V={vocab} d={dim} fp32" + (
                        f" chunk={chunk}" if variant == "chunked" else ""),
                    "ms": res["seconds"] * 1e3, "peak_MiB": res["peak_growth_MiB"],
                    "analytic_MiB": analytic[variant] / 2**20, "loss": res["loss"]})  # fmt: skip
    return out


# ------------------------------------------------------------------------------- report


def _table(rows: list[dict]) -> str:
    cols = ["op", "impl", "shape", "ms", "GB/s", "TFLOP/s", "peak_MiB", "analytic_MiB"]
    cols = [c for c in cols if any(c in r for r in rows)]

    def fmt(v):
        if v is None:
            return ""
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per op, fewer reps")
    parser.add_argument(
        "--ops",
        default="rmsnorm,cross_entropy,attention",
        help="comma-separated subset of rmsnorm,cross_entropy,attention",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON output (default benchmarks/results/bench_kernels_<mode>.json)",
    )
    parser.add_argument(
        "--memory-rows",
        type=int,
        default=16384,
        help="CPU mode: N for the linear-CE memory comparison",
    )
    parser.add_argument(
        "--attention-impls",
        default=None,
        help="GPU mode: comma-separated subset of triton,sdpa flash,eager,torch.compile",
    )
    parser.add_argument("--memory-child", nargs=4, metavar=("VARIANT", "N", "V", "D"),
                        help=argparse.SUPPRESS)  # fmt: skip
    args = parser.parse_args(argv)
    if args.memory_child:
        variant, n, v, d = args.memory_child
        _memory_child(variant, int(n), int(v), int(d))
        return 0
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = set(ops) - {"rmsnorm", "cross_entropy", "attention"}
    if unknown:
        parser.error(f"unknown ops: {', '.join(sorted(unknown))}")
    impls = args.attention_impls and [i.strip() for i in args.attention_impls.split(",")]
    if impls and set(impls) - set(ATTENTION_IMPLS):
        parser.error(f"--attention-impls: choose from {', '.join(ATTENTION_IMPLS)}")

    cuda = torch.cuda.is_available()
    info = _versions()
    rows: list[dict] = []
    notes = []
    if cuda:
        info["copy_bandwidth_GB/s"] = _copy_bandwidth_gbs()
        if "rmsnorm" in ops:
            rows += gpu_rmsnorm(args.quick)
        if "cross_entropy" in ops:
            rows += gpu_cross_entropy(args.quick)
        if "attention" in ops:
            rows += gpu_attention(args.quick, impls)
    else:
        notes.append(
            "No CUDA device: CPU mode ran the torch reference path at small shapes "
            "and the linear-CE peak-memory comparison. GPU timings need a GPU."
        )
        rows += [r for r in cpu_reference(args.quick) if r["op"] in ops]
        if "cross_entropy" in ops:
            n = min(args.memory_rows, 4096) if args.quick else args.memory_rows
            rows += cpu_linear_ce_memory(n, 32000, 768)
    mode = "cuda" if cuda else "cpu"
    print(f"# bench_kernels ({mode}) - {info}")
    for note in notes:
        print(f"# {note}")
    print(_table(rows))
    out = args.out or RESULTS_DIR / f"bench_kernels_{mode}{'_quick' if args.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": mode, "versions": info, "notes": notes, "rows": rows},
                              indent=2) + "\n")  # fmt: skip
    print(f"# wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

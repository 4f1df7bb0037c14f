"""One prepared GPU check (issue #10): kernel correctness, end to end, speed vs peers.

    make gpu-check                                      # everything, ~8 minutes on an H100
    python3 benchmarks/gpu_check.py --budget-s 170 --steps 150   # what fits in 170 s
    TRITON_INTERPRET=1 python3 benchmarks/gpu_check.py --quick   # CPU: tiny shapes, same code

Work runs in priority order (ceilings, bf16 correctness, end to end, attention speed,
training throughput, a torch.profiler table of one gpt2 step, the other dtypes, RMSNorm
and fused-loss speed (next to Liger-Kernel when its wheel was brought along: `make
gpu-check-prep`), the full shapes, torch.compile peers); an item whose estimate no longer
fits the budget is recorded as "skipped: budget". The JSON
(benchmarks/results/gpu_check.json, and $OUT/gpu_check.json when $OUT or --out is set) is
rewritten after every item, so a run cut short keeps what it measured. A short table is
printed last. Exit status 1 when a correctness or end-to-end check failed. Installs
nothing: without an installed tritonlm the package is mapped from
this checkout (gpu_check_boot.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_check_boot  # noqa: E402
from gpu_check_table import goals, print_table  # noqa: E402

SECTIONS = (
    "ceilings",
    "correctness",
    "e2e",
    "attention",
    "attention_packed",
    "train",
    "profile",
    "rmsnorm",
    "lce",
    "decode",
    "autotune",
)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budget-s", type=float, default=480.0, help="seconds of work to plan for")
    p.add_argument("--hard-s", type=float, default=None,
                   help="stop the running item at this many seconds and still print the "
                   "table (default: budget + 30)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny shapes (CI, the interpreter)")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma list of " + ",".join(SECTIONS)
    )
    p.add_argument("--steps", type=int, default=None, help="end-to-end steps (300; quick: 6)")
    p.add_argument("--max-tier", type=int, default=2, help="correctness tiers: 0, 1 or 2")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    p.add_argument("--cpu-speed", action="store_true",
                   help="without CUDA, still run the speed sections (tiny, through the "
                   "interpreter): proves their code runs; the figures mean nothing")  # fmt: skip
    p.add_argument("--autotune", action="store_true",
                   help="first tune the attention tiles (benchmarks/autotune_kernels.py, a "
                   "few minutes) and run every later item with the tuned table, written to "
                   "results/kernel_configs_<arch>.json")  # fmt: skip
    p.add_argument("--json", default=str(HERE / "results" / "gpu_check.json"))
    p.add_argument("--out", default=os.environ.get("OUT") or None, help="copy the JSON here")
    args = p.parse_args(argv)
    bad = set(args.sections.split(",")) - set(SECTIONS)
    if bad:
        p.error(f"unknown section(s) {', '.join(sorted(bad))}; choose from {', '.join(SECTIONS)}")
    if args.steps is not None and args.steps < 25 and not args.quick:
        p.error("--steps must be at least 25 (the curves are compared as 20-step averages)")
    return args


class HardLimit(BaseException):
    """Raised by the alarm at --hard-s: ends the current item, keeps everything measured."""


class Runner:
    """Runs (priority, section, label, estimate, fn) items within the budget; keeps JSON."""

    def __init__(self, args, report: dict):
        self.args, self.report, self.t0 = args, report, time.perf_counter()
        self.items: list[tuple[float, str, str, float, object]] = []

    def add(self, prio, section, label, est, fn) -> None:
        if section in self.args.sections.split(","):
            self.items.append((prio, section, label, est, fn))

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self) -> None:
        hard = self.args.hard_s if self.args.hard_s is not None else self.args.budget_s + 30
        cut = False

        def alarm(*_):
            raise HardLimit()

        signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, max(hard, 0.001))
        try:
            self._run_items()
        except HardLimit:
            cut = True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for _prio, section, label, _est, _fn in self.pending:  # what the cut left unrun
            self.report["results"].setdefault(section, []).append(
                {"item": label, "skipped": "hard limit"}
            )
        self.report["elapsed_s"] = self.elapsed()
        self.report["cut_at_hard_limit"] = cut
        self.save()

    def _run_items(self) -> None:
        self.pending = sorted(self.items, key=lambda i: i[0])
        while self.pending:
            _prio, section, label, est, fn = self.pending.pop(0)
            rows = self.report["results"].setdefault(section, [])
            if self.elapsed() + est > self.args.budget_s:
                rows.append({"item": label, "skipped": "budget", "estimate_s": est})
                continue
            t = time.perf_counter()
            try:
                rec = fn()
            except HardLimit:
                rows.append({"item": label, "skipped": "cut at the hard limit",
                             "seconds": round(time.perf_counter() - t, 3)})  # fmt: skip
                self.save()
                raise
            except Exception as e:  # one item failing must not lose the others
                first = (str(e).splitlines() or [""])[0][:300]
                rec = {"error": f"{type(e).__name__}: {first}",
                       "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
            rec = {"item": label, **rec, "seconds": round(time.perf_counter() - t, 3)}
            rows.append(rec)
            print(f"[{self.elapsed():7.1f}s] {section:11s} {label}: {_brief(rec)}", flush=True)
            self.save()

    def save(self) -> None:
        text = json.dumps(self.report, indent=1, default=str)
        for path in [Path(self.args.json)] + (
            [Path(self.args.out) / "gpu_check.json"] if self.args.out else []
        ):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)


def _brief(rec: dict) -> str:
    if "error" in rec:
        return "ERROR " + rec["error"]
    if "ok" in rec:
        worst = max((v for v in rec.get("rel_err", {}).values()), default=None)
        extra = f" worst rel err {worst:.2e} (tol {rec['tol']:.0e})" if worst is not None else ""
        return ("ok" if rec["ok"] else "FAIL") + extra
    return ", ".join(f"{k}={v:.4g}" for k, v in rec.items() if isinstance(v, float))[:160]


def environment(device: str, how: str) -> dict:
    import torch
    import triton

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": device,
        "tritonlm_import": how,
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        env["transformers"] = "missing: the transformers peer is skipped"
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=p.total_memory / 2**30,
                   cuda=torch.version.cuda)  # fmt: skip
    return env


def build_plan(r: Runner, device: str, args) -> None:
    import gpu_check_kernels as K
    import gpu_check_train as TR

    quick, cuda = args.quick, device == "cuda"
    if args.autotune and (cuda or quick):  # before the speed items, which then use its table
        import autotune_kernels as AT

        r.add(2.8, "autotune", "attention tiles", 15.0 if quick else 240.0,
              lambda: AT.tune_and_use(quick, Path(args.json).parent))  # fmt: skip
    # correctness: bf16 tier 0 first, other dtypes of tier 0 later, full shapes last
    first_dtype = None
    for tier, label, fn in K.plan(device, quick):
        if tier > args.max_tier:
            continue
        first_dtype = first_dtype or label.split()[1]
        prio = {0: 1 if label.split()[1] == first_dtype else 5, 1: 8, 2: 10}[tier]
        r.add(prio, "correctness", label, 1.0 if quick else 3.0 + 2.0 * tier, fn)
    steps = args.steps or (3 if quick else 300)
    # one narrow block: the interpreter takes about a second per training step
    tiny = dict(max_seq_len=32, n_layers=1, d_model=64, n_heads=2, d_ff=128)
    if quick:
        r.add(2, "e2e", f"tiny model {steps} steps", 20.0,
              lambda: TR.end_to_end("seed", 256, steps, 2, device, tiny, n_gen=4))  # fmt: skip
    else:
        r.add(2, "e2e", f"small preset {steps} steps", 15.0 + 0.06 * steps,
              lambda: TR.end_to_end("small", 8192, steps, 16, device))  # fmt: skip
    import gpu_check_decode as DEC

    if quick:  # on the CPU the graphs fall back to eager: the fallback is what is checked
        r.add(2.5, "decode", "tiny one stream", 10.0,
              lambda: DEC.one_stream("seed", 256, 8, device, tiny))  # fmt: skip
        r.add(2.5, "decode", "tiny scheduler 4 streams", 10.0,
              lambda: DEC.scheduler_aggregate("seed", 256, 4, 6, device, tiny))  # fmt: skip
    else:
        for preset, V in (("small", 8192), ("gpt2", 50257)):
            r.add(3, "decode", f"{preset} one stream", 30.0,
                  lambda p=preset, V=V: DEC.one_stream(p, V, 128, device))  # fmt: skip
            if not args.no_compile and cuda:
                r.add(9, "decode", f"{preset} transformers static cache + compile", 120.0,
                      lambda p=preset, V=V: DEC.hf_static_compiled(p, V, 128, device))  # fmt: skip
        r.add(4, "decode", "small scheduler 16 streams", 40.0,
              lambda: DEC.scheduler_aggregate("small", 8192, 16, 64, device))  # fmt: skip
    if not cuda and not args.cpu_speed:
        for s in (
            "ceilings",
            "attention",
            "attention_packed",
            "train",
            "profile",
            "rmsnorm",
            "lce",
        ):
            if s in args.sections.split(","):
                r.report["results"][s] = [{"item": s, "skipped": "no CUDA device"}]
        return
    import gpu_check_speed as S

    r.add(0, "ceilings", "copy + matmul", 5.0, lambda: S.ceilings(quick))
    r.add(0, "ceilings", "optional peers", 0.1, S.optional_peers)
    Ts = ((32,) if not cuda else (512, 2048)) if quick else (2048, 4096, 8192, 1024, 512)
    for i, T in enumerate(Ts):
        for D in (128, 64) if cuda else (32,):
            r.add(3 if i < 3 else 7, "attention", f"T{T} D{D}", 4.0,
                  lambda T=T, D=D: S.attention_speed(T, D, quick))  # fmt: skip
    # grouped-query attention (Hkv = H/4; quick: H/2) vs SDPA on k/v expanded to H heads
    T, D, G = (4096, 128, 4) if not quick else ((512, 128, 4) if cuda else (32, 32, 2))
    r.add(3.1, "attention", f"T{T} D{D} GQA/{G}", 4.0,
          lambda T=T, D=D, G=G: S.attention_speed(T, D, quick, group=G))  # fmt: skip
    # packed rows (documents of ~T/8 and ~T/32 tokens) vs SDPA with the same mask
    for i, (T, n) in enumerate(((4096, 512), (4096, 128), (8192, 1024))[: 1 if quick else 3]):
        T, n = (T, n) if cuda or not quick else (64, 8)
        for D in (128,) if cuda else (32,):
            r.add(3.2 if i == 0 else 7, "attention_packed", f"T{T} D{D} docs~{n}", 6.0,
                  lambda T=T, D=D, n=n: S.attention_packed_speed(T, D, n, quick))  # fmt: skip
    # preset -> (vocab, batch, steps, warm-up steps, config overrides)
    plan = {"small": (8192, 64, 25, 5, None), "gpt2": (50257, 16, 20, 5, None)}
    if quick:
        plan = {"small": (8192, 8, 6, 2, None) if cuda else (256, 2, 3, 1, tiny)}
    for preset, (V, B, n, warm, over) in plan.items():
        for backend in ("triton", "torch"):
            r.add(4, "train", f"{preset} ours {backend}", 12.0,
                  lambda p=preset, V=V, B=B, n=n, w=warm, b=backend, o=over:
                  TR.ours_throughput(p, V, B, n, w, device, b, overrides=o))  # fmt: skip
        r.add(4, "train", f"{preset} transformers llama sdpa", 12.0,
              lambda p=preset, V=V, B=B, n=n, w=warm, o=over:
              TR.hf_throughput(p, V, B, n, w, device, overrides=o))  # fmt: skip
        if not args.no_compile and cuda:
            r.add(9, "train", f"{preset} ours triton --compile", 60.0,
                  lambda p=preset, V=V, B=B, n=n, w=warm:
                  TR.ours_throughput(p, V, B, n, w, device, "triton", compile=True))  # fmt: skip
    import gpu_check_profile as PR

    # one profiled gpt2 step (where the MFU gap goes); quick: the tiny model on any device
    if quick:
        r.add(4.5, "profile", "tiny triton step", 20.0,
              lambda: PR.profile_step("seed", 256, 2, 1, device, tiny, top=10))  # fmt: skip
    else:
        r.add(4.5, "profile", "gpt2 triton step", 25.0,
              lambda: PR.profile_step("gpt2", 50257, 16, 3, device))  # fmt: skip
    copy = lambda: _copy_bw(r.report)  # noqa: E731 - read once the ceilings have run
    for i, d in enumerate((4096, 2048, 768) if not quick else (768,)):
        N = (1024 if cuda else 64) if quick else 16384
        r.add(3.5 if i == 0 else 6, "rmsnorm", f"N{N} d{d}", 3.0,
              lambda N=N, d=d: S.rmsnorm_speed(N, d, copy(), False))  # fmt: skip
        if not args.no_compile and cuda:
            r.add(9, "rmsnorm", f"N{N} d{d} +torch.compile", 25.0,
                  lambda N=N, d=d: S.rmsnorm_speed(N, d, copy(), True))  # fmt: skip
    for i, V in enumerate((128256, 50257, 32000) if not quick else (32000 if cuda else 300,)):
        N, d = (8192, 2048) if not quick else ((512, 256) if cuda else (32, 32))
        r.add(3.5 if i == 0 else 10, "lce", f"N{N} d{d} V{V}", 5.0,
              lambda N=N, d=d, V=V: S.linear_ce_speed(N, d, V))  # fmt: skip


def _copy_bw(report: dict) -> float | None:
    rows = report["results"].get("ceilings", [])
    return next((r["copy_GBps"] for r in rows if "copy_GBps" in r), None)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print(
            "gpu_check: torch is not installed (nothing is installed by this script)",
            file=sys.stderr,
        )
        return 2
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        if "triton" in sys.modules:
            print(
                "gpu_check: no CUDA device and triton already imported; set TRITON_INTERPRET=1",
                file=sys.stderr,
            )
            return 2
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run the interpreter
    try:
        import triton  # noqa: F401
    except ImportError:
        print(
            "gpu_check: triton is not installed (nothing is installed by this script)",
            file=sys.stderr,
        )
        return 2
    how = gpu_check_boot.ensure_importable()
    gpu_check_boot.add_peer_wheels()
    liger = gpu_check_boot.peer_status("liger_kernel", "liger_kernel")
    if liger.startswith("missing"):
        print(f"gpu_check: Liger-Kernel peer {liger}", flush=True)
    report = {"args": vars(args), "env": environment(device, how), "results": {}}
    runner = Runner(args, report)
    build_plan(runner, device, args)
    runner.run()
    if device == "cuda":
        report["env"]["peak_mem_gib_process"] = torch.cuda.max_memory_allocated() / 2**30
        report["goals"] = goals(report)  # H100 goals: meaningless for a CPU smoke run
    failed = summarize(report)
    report["failed_checks"] = failed
    runner.save()
    print_table(report)
    return 1 if failed else 0


def summarize(report: dict) -> list[str]:
    """Labels of failed correctness / end-to-end items (errors included)."""
    bad = []
    for section in ("correctness", "e2e"):
        for r in report["results"].get(section, []):
            if "skipped" not in r and not r.get("ok"):
                bad.append(f"{section}: {r['item']}")
    return bad


if __name__ == "__main__":
    sys.exit(main())

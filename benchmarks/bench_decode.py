"""Benchmark the decode step on the CPU: threads (next to a busy core or not), eager vs
compiled step, float32 vs int8 weights, row- vs column-major weight storage.

For each preset (random weights, vocab --vocab): greedy ``generate`` of --new-tokens
tokens after a --prompt-len prompt, never stopping early; decode tokens/s =
(new tokens - 1) / (total - time to first token). Each cell is the best of --repeats runs
after a warm-up, the contenders interleaved (noise on a shared machine only adds time).

  threads   eager float32 with 1 thread and with 2 threads, alone and while a second process
            spins on a core (``python -c "while True: pass"``)
  step      1 thread: the eager step, the compiled step (``torch.compile`` of the whole
            step, compiled once before timing), each with float32 and int8 weights, each
            with the weights as trained (row-major, "row", as the commands load them for
            a compiled step) and column-major ("col", as they load them for an eager
            step: engine.model.inference_weights); int8 includes the output projection
  stream    1 thread: every weight matrix of the preset multiplied by one row in turn
            (what a decode step reads), F.linear with row- vs column-major storage, in
            GB/s of weights read

Prints a table and writes JSON with the machine, versions and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from bench_generate import machine_info

HERE = Path(__file__).resolve().parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", default="seed,small")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--parts", default="threads,step", help="threads, step and/or stream")
    p.add_argument("--weights", default="fp32,int8")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--layouts", default="row,col", help="weight storage: row and/or col")
    p.add_argument("--out", default=str(HERE / "results" / "bench_decode.json"))
    p.add_argument("--quick", action="store_true", help="seed, 8 tokens, 1 repeat, no compile")
    args = p.parse_args(argv)
    if args.quick:
        args.presets, args.new_tokens, args.repeats, args.modes = "seed", 8, 1, "eager"
    return args


def build(preset, vocab, weights, layout="row"):
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.inference_weights import column_major
    from tritonlm.engine.model.int8 import quantize_int8
    from tritonlm.engine.model.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset(preset, vocab_size=vocab), backend="torch").eval()
    if weights == "int8":
        quantize_int8(model, head=True)  # as the inference commands load int8
    if layout == "col":
        column_major(model)
    return model


def runner(model, args, mode, threads):
    from tritonlm.engine.inference.generate import generate
    from tritonlm.engine.inference.sampling import SamplingConfig
    from tritonlm.engine.model.decode_step import DecodeStep

    prompt = [3 + (7 * i) % 200 for i in range(args.prompt_len)]
    cfg = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)
    cache = model.new_cache(1, max_len=args.prompt_len + args.new_tokens)
    decoder = DecodeStep(model, cache, mode)

    def run():
        torch.set_num_threads(threads)
        r = generate(model, None, prompt, cfg, stop_token_ids=[], decoder=decoder)
        assert r.new_tokens == args.new_tokens
        return r.decode_tokens_per_s, r.token_ids

    return run


def stream_rates(preset: str, vocab: int, repeats: int) -> dict:
    """GB/s of one-row products over all of the preset's matrices, row vs column major."""
    import torch.nn.functional as F

    model = build(preset, vocab, "fp32")
    mats = [p.detach() for p in model.parameters() if p.dim() == 2]
    gbytes = sum(m.numel() * m.element_size() for m in mats) / 1e9
    layouts = {"row": mats, "col": [m.t().contiguous().t() for m in mats]}
    xs = {m.shape[1]: torch.randn(1, m.shape[1]) for m in mats}
    torch.set_num_threads(1)

    def run(ws):
        t0 = time.perf_counter()
        for _ in range(10):
            for w in ws:
                F.linear(xs[w.shape[1]], w)
        return 10 * gbytes / (time.perf_counter() - t0)

    rates = {k: [] for k in layouts}
    for i in range(repeats + 1):  # the first round warms up
        for k in layouts if i % 2 == 0 else reversed(list(layouts)):
            rate = run(layouts[k])
            if i:
                rates[k].append(rate)
    return {"gbytes": gbytes, **{k: max(v) for k, v in rates.items()}}


def best(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        fn()  # warm-up (and, for the compiled step, the compile)
    rates = {k: [] for k in fns}
    for i in range(repeats):
        for k in fns if i % 2 == 0 else reversed(list(fns)):
            rates[k].append(fns[k]()[0])
    return {k: max(v) for k, v in rates.items()}


def main(argv=None) -> int:
    args = parse_args(argv)
    info = machine_info(torch.device("cpu"))
    info["loadavg_start"] = os.getloadavg()
    rows = []
    for preset in args.presets.split(","):
        if "threads" in args.parts:
            model = build(preset, args.vocab, "fp32")
            for busy in (False, True):
                spin = (
                    subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
                )
                try:
                    fns = {t: runner(model, args, "eager", t) for t in (1, 2)}
                    got = best(fns, args.repeats)
                finally:
                    if spin is not None:
                        spin.kill()
                        spin.wait()
                for t, rate in got.items():
                    rows.append(dict(preset=preset, part="threads", threads=t, busy_core=busy,
                                     mode="eager", weights="fp32", decode_tok_s=rate))  # fmt: skip
        if "step" in args.parts:
            fns, tokens = {}, {}
            for weights in args.weights.split(","):
                for layout in args.layouts.split(","):
                    model = build(preset, args.vocab, weights, layout)
                    for mode in args.modes.split(","):
                        t0 = time.perf_counter()
                        fn = runner(model, args, mode, 1)
                        key = (mode, weights, layout)
                        tokens[key] = fn()[1]
                        print(f"{preset} {mode} {weights} {layout}: first run "
                              f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
                        fns[key] = fn
            got = best(fns, args.repeats)
            ref = tokens.get(("eager", "fp32", "row"))
            for (mode, weights, layout), rate in got.items():
                same = None if ref is None else tokens[(mode, weights, layout)] == ref
                rows.append(dict(preset=preset, part="step", threads=1, busy_core=False,
                                 mode=mode, weights=weights, layout=layout, decode_tok_s=rate,
                                 same_tokens_as_eager_fp32=same))  # fmt: skip
        if "stream" in args.parts:
            got = stream_rates(preset, args.vocab, args.repeats)
            for layout in ("row", "col"):
                rows.append(dict(preset=preset, part="stream", threads=1, busy_core=False,
                                 mode="F.linear", weights="fp32", layout=layout,
                                 weight_gbytes=got["gbytes"],
                                 gbytes_per_s=got[layout]))  # fmt: skip
    info["loadavg_end"] = os.getloadavg()
    print(f"{'preset':<7} {'part':<8} {'threads':>7} {'busy':>5} {'mode':<8} {'weights':<7} "
          f"{'layout':<6} {'decode tok/s':>12}")  # fmt: skip
    for r in rows:
        rate = (f"{r['decode_tok_s']:>12.1f}" if "decode_tok_s" in r
                else f"{r['gbytes_per_s']:>8.1f} GB/s")  # fmt: skip
        print(f"{r['preset']:<7} {r['part']:<8} {r['threads']:>7} {str(r['busy_core']):>5} "
              f"{r['mode']:<8} {r['weights']:<7} {r.get('layout', 'row'):<6} {rate}")  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

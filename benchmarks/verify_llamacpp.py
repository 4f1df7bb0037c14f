"""Prove our GGUF export against llama.cpp itself, and time llama.cpp next to us.

    python benchmarks/verify_llamacpp.py [--ckpt CKPT] [--venv DIR] [--threads 1,2]
    python benchmarks/verify_llamacpp.py --speed-only --threads 1 --ours fp32,int8,fp32-compile

1. llama.cpp: ``llama-cpp-python`` (which builds llama.cpp from source, CPU only) is
   installed from the package index into its own environment (--venv), never into ours;
   the install time is recorded. This script then runs itself there as a worker
   (``--worker JOB``) that imports only llama_cpp and numpy.
2. Models: the ``seed`` checkpoint (--ckpt; trained with llm-train when not given) and a
   ``small``-preset model of seeded random weights with a tokenizer trained on
   data/pretrain.json, each exported with :func:`export_gguf` as f32, f16 and q8_0.
3. Tokenizer: llama.cpp's ids for held-out text (README paragraphs, code, Unicode) must be
   ``[<|bos|>] + tokenizer.encode(text)``, and chat prompts rendered by llama-cpp-python
   from the file's Jinja template must be ``render_chat``'s ids; known edge cases apart.
4. Greedy continuation: for each prompt, 32 tokens by llama.cpp (argmax of its logits,
   stopping at our stop tokens) must equal ``llm-chat CKPT --raw --temperature 0`` (the
   text, run as a subprocess) and the engine's ``generate`` (the ids), for f32 and f16.
   Grouped-query attention, an untied head and head dim 24: last-position logits of a
   random model, llama.cpp (f32 KV cache) vs ours.
5. Speed on the same exported model, 1 and 2 threads: prompt (prefill) tokens/s and
   decode tokens/s, llama.cpp (f32, f16, q8_0 files) vs ours: ``generate`` with the
   decode step llm-chat uses, weights prepared as llm-chat loads them (column-major on the
   CPU; ``--ours`` picks float32 and/or int8, eager and/or ``-compile``d), greedy, best of
   --repeats; then a torch profile of our eager float32 decode step (where the time goes).
   ``--speed-only`` skips 3 and 4.

Prints tables and writes JSON (default benchmarks/results/verify_llamacpp.json). Not part
of the test suite: it installs a package and takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLAMA_CPP_VERSION = "0.3.36"
# Lean CPU build: no GPU backends, no tools/examples/tests/server, no libcurl.
CMAKE_ARGS = (
    "-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF -DGGML_CUDA=OFF "
    "-DGGML_VULKAN=OFF -DGGML_METAL=OFF"
)
MAX_NEW = 32
DTYPES = ("f32", "f16", "q8_0")

PROMPTS = [  # raw continuation prompts (held out: not in data/)
    "The tokenizer",
    "A language model is",
    "Once upon a time",
    "Training",
]
CHATS = [  # chat prompts rendered by llama-cpp-python from the file's template
    [{"role": "user", "content": "What is a tokenizer?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "Hi! naïve café?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "What's BPE?"},
    ],
]
EDGE_CASES = [  # known differences, reported apart (see the README's GGUF section)
    "it'ſx",  # (?i:'s) also matches the long s U+017F; llama.cpp's '[sS] does not
    "cafe\u0301",  # not NFC: we normalize to 'café', llama.cpp does not normalize
]


def held_out_texts() -> list[str]:
    """Text the tokenizer never saw: README paragraphs, code, numbers, Unicode, spacing."""
    paras = [p for p in (ROOT / "README.md").read_text(encoding="utf-8").split("\n\n") if p]
    return paras[:60] + [
        "DON'T panic: it's 12,345.6789 km/h; we'LL see. I'M sure THEY'RE right, you'VE seen.",
        "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\r\n\r\n   \n",
        "naïve café, Ünïcode ✓ 中文测试 日本語 한국어 😀👍🏽 ﬁ Ωmega ‘quotes’ — «done»",
        "   leading spaces and trailing   ",
        "\n\n\nnewlines\n \n",
        "1234567890 3.14159 0x1F 1e-9",
        "<|bos|> <|end|> special-looking text is plain text",
    ]


# ----------------------------------------------------------------------------- install


def ensure_llama_cpp(venv: Path, log: Path) -> dict:
    """Install llama-cpp-python into ``venv`` unless it imports already; return facts."""
    py = venv / "bin" / "python"
    check = [str(py), "-c", "import llama_cpp; print(llama_cpp.__version__)"]
    if py.exists():
        r = subprocess.run(check, capture_output=True, text=True)
        if r.returncode == 0:
            return {"installed_now": False, "version": r.stdout.strip()}
    t0 = time.perf_counter()
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "CMAKE_ARGS": CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
    cmd = [str(py), "-m", "pip", "install", "--no-cache-dir", "-v"]
    with open(log, "w") as f:
        r = subprocess.run(
            cmd + [f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
        )
    seconds = time.perf_counter() - t0
    if r.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-30:]
        errors = [line for line in tail if "error" in line.lower()] or tail[-5:]
        raise SystemExit(f"llama-cpp-python did not build ({seconds:.0f} s): {errors[-1]}")
    version = subprocess.run(check, capture_output=True, text=True).stdout.strip()
    return {"installed_now": True, "version": version, "install_s": round(seconds, 1)}


# ----------------------------------------------------------------------------- worker side


def argmax_last(llm, vocab: int) -> int:
    """The greedy token: argmax of the logits of the last evaluated position."""
    import numpy as np

    return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(vocab,))))


def worker(job_path: str) -> int:
    """Runs in the llama.cpp environment: tokenize, continue greedily, time. JSON out."""
    import llama_cpp
    import numpy as np

    job = json.loads(Path(job_path).read_text())
    out = {"llama_cpp_python": llama_cpp.__version__, "models": {}}
    for name, spec in job["models"].items():
        res = out["models"][name] = {}
        llm = llama_cpp.Llama(
            spec["path"],
            n_ctx=spec["n_ctx"],
            n_batch=spec["n_ctx"],
            n_threads=1,
            n_threads_batch=1,
            verbose=False,
        )
        vocab = llm.n_vocab()
        if spec.get("logits_ids"):  # with an f32 KV cache (type_k/v 0), as ours is
            exact = llama_cpp.Llama(
                spec["path"], n_ctx=spec["n_ctx"], type_k=0, type_v=0, n_threads=1, verbose=False
            )
            exact.eval(spec["logits_ids"])
            got = np.ctypeslib.as_array(exact._ctx.get_logits(), shape=(vocab,))
            res["last_logits"] = [float(x) for x in got]
            del exact

        if spec.get("texts"):
            res["tokens"] = [
                llm.tokenize(t.encode(), add_bos=True, special=False) for t in spec["texts"]
            ]
        if spec.get("chats"):  # the GGUF's chat template, as llama-cpp-python applies it
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            fmt = Jinja2ChatFormatter(
                llm.metadata["tokenizer.chat_template"],
                eos_token=spec["eos"],
                bos_token=spec["bos"],
            )
            res["chat_tokens"] = []
            for messages in spec["chats"]:
                r = fmt(messages=messages)
                res["chat_tokens"].append(
                    llm.tokenize(r.prompt.encode(), add_bos=not r.added_special, special=True)
                )
        if spec.get("prompts"):
            res["continuations"] = []
            for prompt in spec["prompts"]:
                llm.reset()
                ids = llm.tokenize(prompt.encode(), add_bos=True, special=False)
                llm.eval(ids)
                new = []
                while len(new) < job["max_new"] and len(ids) + len(new) < spec["n_ctx"]:
                    t = argmax_last(llm, vocab)
                    new.append(t)
                    if t in spec["stop_ids"]:
                        break
                    llm.eval([t])
                text = llm.detokenize(new, special=False).decode("utf-8", errors="replace")
                res["continuations"].append({"ids": new, "text": text})
        del llm
        if spec.get("speed"):
            res["speed"] = {}
            for n in job["threads"]:
                llm = llama_cpp.Llama(
                    spec["path"],
                    n_ctx=spec["n_ctx"],
                    n_batch=spec["n_ctx"],
                    n_threads=n,
                    n_threads_batch=n,
                    verbose=False,
                )
                prompt, n_new = spec["speed"]["prompt"], spec["speed"]["n_new"]
                best_p = best_d = float("inf")
                for _ in range(job["repeats"] + 1):  # the first run warms up
                    llm.reset()
                    t0 = time.perf_counter()
                    llm.eval(prompt)
                    t = argmax_last(llm, vocab)
                    t1 = time.perf_counter()
                    for _ in range(n_new):
                        llm.eval([t])
                        t = argmax_last(llm, vocab)
                    t2 = time.perf_counter()
                    best_p, best_d = min(best_p, t1 - t0), min(best_d, t2 - t1)
                res["speed"][str(n)] = {
                    "prompt_tok_s": len(prompt) / best_p,
                    "decode_tok_s": n_new / best_d,
                }
                del llm
    Path(job["out"]).write_text(json.dumps(out))
    return 0


# ----------------------------------------------------------------------------- our side


def train_seed(out: Path) -> Path:
    """The README's demo run: a seed model pretrained then instruction-tuned on data/."""
    if (out / "config.json").exists():
        return out
    cmd = [
        str(Path(sys.executable).parent / "llm-train"),
        "--data",
        "data/pretrain.json",
        "--chat-data",
        "data/chat.json",
        "--preset",
        "seed",
        "--out",
        str(out),
        "--pretrain-steps",
        "600",
        "--sft-steps",
        "300",
        "--quiet",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def ours_model(model, variant: str):
    """A copy of ``model`` as llm-chat runs it for ``variant`` ("fp32", "int8",
    "fp32-compile", "int8-compile"), and its decode mode."""
    import copy

    from tritonlm.engine.model.inference_weights import prepare_inference_weights

    weights, _, mode = variant.partition("-")
    mode = mode or "eager"
    return prepare_inference_weights(copy.deepcopy(model), weights,
                                     compiled=mode == "compile"), mode  # fmt: skip


def ours_speed(model, mode: str, prompt: list[int], n_new: int, threads: int,
               repeats: int) -> dict:  # fmt: skip
    """Prefill and decode tokens/s of ``generate`` with a reused decode step (as llm-chat),
    greedy, never stopping early; the first run warms up (and compiles)."""
    import torch
    from tritonlm.engine.inference.generate import generate
    from tritonlm.engine.inference.sampling import SamplingConfig
    from tritonlm.engine.model.decode_step import DecodeStep

    torch.set_num_threads(threads)
    cfg = SamplingConfig(temperature=0, max_new_tokens=n_new + 1)
    decoder = DecodeStep(model, model.new_cache(1, max_len=len(prompt) + n_new + 2), mode)
    best_p = best_d = 0.0
    for _ in range(repeats + 1):
        r = generate(model, None, prompt, cfg, stop_token_ids=[], decoder=decoder)
        best_p = max(best_p, len(prompt) / r.time_to_first_token_s)
        best_d = max(best_d, r.decode_tokens_per_s)
    return {"prompt_tok_s": best_p, "decode_tok_s": best_d}


def profile_decode(model, prompt: list[int], n_new: int) -> list[tuple[str, float]]:
    """Share of one-thread decode time per torch op (self CPU time), plus the rest: the
    eager decode step over ``model`` (prepared as llm-chat loads it)."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from tritonlm.engine.model.decode_step import DecodeStep

    torch.set_num_threads(1)
    step = DecodeStep(model, model.new_cache(1, max_len=len(prompt) + n_new + 1))
    pad = torch.zeros(1, dtype=torch.long)
    with torch.inference_mode():
        t = model.forward_cached(torch.tensor([prompt]), step.cache, last_only=True)[0, -1]
        t = t.argmax().view(1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for i in range(len(prompt), len(prompt) + n_new):
                t = step(t, torch.tensor([i]), pad, i + 1).argmax(-1)
            wall = time.perf_counter() - t0
    rows = sorted(
        ((e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda r: -r[1]
    )
    in_ops = sum(s for _, s in rows)
    top = [(k, s / wall) for k, s in rows[:8]]
    return top + [
        ("(other ops)", (in_ops - sum(s for _, s in rows[:8])) / wall),
        ("(python, outside torch ops)", max(0.0, wall - in_ops) / wall),
    ]


def llm_chat_text(ckpt: Path, prompt: str) -> str:
    cmd = [
        str(Path(sys.executable).parent / "llm-chat"),
        str(ckpt),
        "--raw",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-new-tokens",
        str(MAX_NEW),
        "--json",
        "--device",
        "cpu",
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL)
    return json.loads(r.stdout.strip().splitlines()[-1])["text"]


def build_small(out: Path) -> Path:
    """A ``small``-preset checkpoint of seeded random weights, vocabulary 4096 trained on
    data/pretrain.json (llama.cpp's speed does not depend on what the weights learned)."""
    if (out / "config.json").exists():
        return out
    import torch
    from tritonlm.engine.checkpoint.save_load import save_checkpoint
    from tritonlm.engine.data.records import load_texts
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer
    from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
    from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

    texts = load_texts([ROOT / "data" / "pretrain.json"]).items
    tok = BpeTokenizer.train(texts, BpeTokenizerConfig(vocab_size=4096))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("small", vocab_size=tok.vocab_size), backend="torch")
    save_checkpoint(out, model, tok)
    return out


def check_gqa_logits(work: Path, tok, venv: Path) -> dict:
    """Grouped-query attention, an untied head and head dim 24 (shapes the two presets do
    not have): llama.cpp's last-position logits vs ours on a seeded random model."""
    import torch
    from tritonlm.engine.interop.gguf_export import export_gguf
    from tritonlm.engine.model.config import ModelConfig
    from tritonlm.engine.model.transformer import Transformer

    torch.manual_seed(1)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size,
        d_model=96,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        d_ff=160,
        max_seq_len=64,
        tie_embeddings=False,
        init_std=0.2,
    )  # larger weights: logits far from uniform
    model = Transformer(cfg, backend="torch").eval()
    path = work / "gqa-f32.gguf"
    export_gguf(model, tok, path, "f32")
    ids = [tok.bos_id, *tok.encode(PROMPTS[0] + " splits text into pieces.")]
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0, -1]
    spec = {"path": str(path), "n_ctx": 64, "stop_ids": [], "logits_ids": ids}
    theirs = torch.tensor(
        run_worker(venv, {"models": {"gqa": spec}}, work)["models"]["gqa"]["last_logits"]
    )
    res = {
        "shape": "d 96, 4 heads, 2 kv heads, head dim 24, untied",
        "prompt_tokens": len(ids),
        "max_abs_diff": float((theirs - ours).abs().max()),
        "max_abs_logit": float(ours.abs().max()),
        "same_argmax": int(theirs.argmax()) == int(ours.argmax()),
    }
    print(
        f"\n== logits, {res['shape']}: max |llama.cpp - ours| = {res['max_abs_diff']:.2e} "
        f"(logits up to {res['max_abs_logit']:.1f}), same argmax: {res['same_argmax']}"
    )
    return res


def check_tokenizer(loaded: dict, texts: list[str], theirs: dict) -> dict:
    """llama.cpp's ids vs ``[<|bos|>] + encode(text)`` per text; edge cases apart."""
    print("\n== tokenizer: llama.cpp ids vs [<|bos|>] + encode(text), held-out text")
    out = {}
    for preset, (_, _, tok) in loaded.items():
        got = theirs["models"][f"{preset}/f32"]["tokens"]
        pairs = zip(texts + EDGE_CASES, got, strict=True)
        equal = [ids == [tok.bos_id, *tok.encode(t)] for t, ids in pairs]
        res = out[preset] = {
            "texts": len(texts),
            "tokens": sum(map(len, got[: len(texts)])),
            "mismatches": [texts[i] for i, ok in enumerate(equal[: len(texts)]) if not ok],
            "edge_cases_equal": dict(zip(EDGE_CASES, equal[len(texts) :], strict=True)),
            "chat_prompts_equal": [
                ids == tok.render_chat(m, add_generation_prompt=True)[0]
                for m, ids in zip(
                    CHATS, theirs["models"][f"{preset}/f32"]["chat_tokens"], strict=True
                )
            ],
        }
        print(
            f"{preset:6} vocab {tok.vocab_size:5}: {res['texts']} texts, {res['tokens']} "
            f"tokens, {len(res['mismatches'])} mismatches; edge cases {res['edge_cases_equal']}; "
            f"chat template prompts equal: {res['chat_prompts_equal']}"
        )
    return out


def check_greedy(loaded: dict, theirs: dict) -> dict:
    """llama.cpp's greedy ids and text vs the engine's generate and llm-chat's text."""
    from tritonlm.engine.inference.chat_prompt import encode_raw_prompt
    from tritonlm.engine.inference.generate import generate
    from tritonlm.engine.inference.sampling import SamplingConfig

    greedy = SamplingConfig(temperature=0, max_new_tokens=MAX_NEW)
    print(f"\n== greedy, {MAX_NEW} tokens: llama.cpp vs llm-chat --raw --temperature 0")
    out = {}
    for preset, (ckpt, model, tok) in loaded.items():
        ours = [generate(model, tok, encode_raw_prompt(tok, p), greedy) for p in PROMPTS]
        chat = [llm_chat_text(ckpt, p) for p in PROMPTS]
        for dtype in ("f32", "f16"):
            cont = theirs["models"][f"{preset}/{dtype}"]["continuations"]
            rows = out[f"{preset}/{dtype}"] = [
                {
                    "prompt": p,
                    "ids_equal": o.token_ids == c["ids"],
                    "text_equal": t == c["text"] == o.text,
                    "ours": o.token_ids,
                    "llama_cpp": c["ids"],
                    "text": t,
                }
                for p, o, t, c in zip(PROMPTS, ours, chat, cont, strict=True)
            ]
            ok = sum(r["ids_equal"] and r["text_equal"] for r in rows)
            print(f"{preset:6} {dtype:5}: {ok}/{len(rows)} prompts identical")
    return out


def run_worker(venv: Path, job: dict, work: Path) -> dict:
    """Run this script in the llama.cpp environment on ``job``; return its JSON answer."""
    job = {**job, "out": str(work / "llama_out.json")}
    (work / "job.json").write_text(json.dumps(job))
    cmd = [str(venv / "bin" / "python"), __file__, "--worker", str(work / "job.json")]
    subprocess.run(cmd, check=True)
    return json.loads(Path(job["out"]).read_text())


def best(cells: list[dict]) -> dict:
    return {k: max(c[k] for c in cells) for k in cells[0]}


def compare_speed(loaded: dict, specs: dict, args, threads: list[int]) -> tuple[dict, dict]:
    """Ours (each --ours variant) vs llama.cpp on each exported file, in alternating rounds
    (the machine is shared: both sides see the same load), best of --repeats each; then a
    profile of our eager float32 decode step."""
    variants = args.ours.split(",")
    print(f"\n== tokens/s, best of {args.repeats}: pp = prompt (prefill), tg = decode")
    print(f"{'model':7} {'thr':>3} " + " ".join(f"{'ours ' + v:>22}" for v in variants)
          + " | llama.cpp pp / tg: " + ", ".join(DTYPES))  # fmt: skip
    speed, prof = {}, {}
    for preset, (_, model, _) in loaded.items():
        spec = specs[f"{preset}/f32"]["speed"]
        ours_models = {v: ours_model(model, v) for v in variants}
        for n in threads:
            job = {
                "models": {
                    d: {**specs[f"{preset}/{d}"], "texts": None, "prompts": None} for d in DTYPES
                },
                "threads": [n],
                "repeats": 1,
            }
            rounds = []
            for _ in range(args.repeats):
                theirs = run_worker(args.venv, job, args.work)["models"]
                ours = {f"ours_{v}": ours_speed(m, mode, spec["prompt"], spec["n_new"], n, 1)
                        for v, (m, mode) in ours_models.items()}  # fmt: skip
                rounds.append(ours | {f"llama_cpp_{d}": theirs[d]["speed"][str(n)] for d in DTYPES})
            cell = {k: best([r[k] for r in rounds]) for k in rounds[0]}
            speed[f"{preset}/{n}"] = {
                "prompt_len": len(spec["prompt"]),
                "n_new": spec["n_new"],
                "load_avg_1m": os.getloadavg()[0],
                **cell,
            }
            lc = "  ".join(
                "{prompt_tok_s:7.0f} / {decode_tok_s:5.0f}".format(**cell[f"llama_cpp_{d}"])
                for d in DTYPES
            )
            mine = " ".join(
                "{prompt_tok_s:11.0f} / {decode_tok_s:8.0f}".format(**cell[f"ours_{v}"])
                for v in variants
            )
            print(f"{preset:7} {n:>3} {mine} | {lc}")
        prof[preset] = profile_decode(ours_model(model, "fp32")[0], spec["prompt"], spec["n_new"])
    for preset, rows in prof.items():
        print(
            f"{preset} decode, 1 thread, share of wall time: "
            + ", ".join(f"{k} {v:.0%}" for k, v in rows)
        )
    return speed, prof


def run(args) -> int:
    import torch
    from tritonlm.engine.checkpoint.save_load import load_checkpoint
    from tritonlm.engine.interop.gguf_export import export_gguf
    from tritonlm.engine.tokenizer.tokenizer_config import SPECIAL_TOKENS

    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    install = ensure_llama_cpp(args.venv, args.work / "pip_install.log")
    print(f"llama-cpp-python {install['version']} ready ({time.perf_counter() - t0:.0f} s)")
    ckpts = {
        "seed": args.ckpt or train_seed(args.work / "seed"),
        "small": build_small(args.work / "small"),
    }
    threads = [int(n) for n in args.threads.split(",")]
    texts = held_out_texts()
    specs, loaded = {}, {}
    for preset, ckpt in ckpts.items():
        ck = load_checkpoint(ckpt, backend="torch")
        model, tok = ck.model.eval(), ck.tokenizer
        loaded[preset] = (ckpt, model, tok)
        ctx = model.config.max_seq_len
        speed_prompt = [tok.bos_id, *tok.encode(" ".join(texts))][: ctx // 2]
        stop_ids = sorted({tok.special_tokens[s] for s in SPECIAL_TOKENS})  # as generate stops
        for dtype in DTYPES:
            path = args.work / f"{preset}-{dtype}.gguf"
            export_gguf(model, tok, path, dtype)
            specs[f"{preset}/{dtype}"] = {
                "path": str(path),
                "n_ctx": ctx,
                "stop_ids": stop_ids,
                "texts": texts + EDGE_CASES if dtype == "f32" else None,
                "chats": CHATS if dtype == "f32" else None,
                "bos": "<|bos|>",
                "eos": "<|eos|>",
                "prompts": PROMPTS if dtype != "q8_0" else None,
                "speed": {"prompt": speed_prompt, "n_new": min(64, ctx - len(speed_prompt) - 1)},
            }
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "load_avg_start": os.getloadavg(),
        },
        "install": install,
        "ours_variants": args.ours.split(","),
    }
    if not args.speed_only:
        job = {"models": {k: {**v, "speed": None} for k, v in specs.items()}, "max_new": MAX_NEW}
        theirs = run_worker(args.venv, job, args.work)
        report |= {
            "llama_cpp_python": theirs["llama_cpp_python"],
            "tokenizer": check_tokenizer(loaded, texts, theirs),
            "greedy": check_greedy(loaded, theirs),
            "gqa_logits": check_gqa_logits(args.work, loaded["seed"][2], args.venv),
        }
    report["speed"], report["profile"] = compare_speed(loaded, specs, args, threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", metavar="JOB", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", type=Path, help="a trained seed checkpoint (default: train one)")
    p.add_argument("--venv", type=Path, default=Path("/work/tmp/llamacpp_venv"))
    p.add_argument("--work", type=Path, default=Path("/work/tmp/verify_llamacpp"))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "verify_llamacpp.json")
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="only the speed table and profile (no tokenizer/greedy checks)",
    )
    p.add_argument("--ours", default="fp32,int8",
                   help="our contenders: fp32, int8, fp32-compile, int8-compile (the compiled "
                   "step takes minutes to compile first)")  # fmt: skip
    args = p.parse_args(argv)
    unknown = set(args.ours.split(",")) - {"fp32", "int8", "fp32-compile", "int8-compile"}
    if unknown:
        p.error(f"--ours: unknown variant(s) {', '.join(sorted(unknown))}")
    if args.worker:
        return worker(args.worker)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

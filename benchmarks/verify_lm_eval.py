"""Parity with lm-evaluation-harness: our acc / acc_norm against the harness's `hf` model.

Steps (all offline):
  1. a checkpoint: --ckpt, or a small model trained here on data/pretrain.json (llm-train);
  2. a HellaSwag-format task written from sentences of data/pretrain.json (the
     dataset's fields: activity_label, ctx_a, ctx_b, endings, label; some ctx carry the
     WikiHow "[title]" / "[header]" markers the harness's cleanup removes): the true
     continuation of a sentence and three continuations of other sentences;
  3. ``llm-export CKPT HF_DIR`` (a Hugging Face Llama folder);
  4. lm-eval run in its OWN virtual environment (--lm-eval-python; create it with
     ``python -m venv V && V/bin/pip install lm-eval torch==2.13.0 transformers accelerate``) on a
     custom task YAML over the local JSONL, using the harness's own HellaSwag
     ``process_docs``, through ``--model hf`` on the CPU in float32, with --log_samples;
  5. ``llm-eval`` (our engine) on the same file; per item, the four log-likelihoods, the
     acc / acc_norm picks and the aggregates are compared.

BOS: our models read ``<|bos|>`` before every document, and ``llm-eval`` puts it before
the context. The exported tokenizer adds no special tokens on its own, so the task YAML's
``description`` is ``<|bos|>`` (the harness puts the description first; the HF tokenizer
reads it as the BOS token), and both sides score the very same token rows.

``--served``: step 4 instead runs lm-eval (installed in THIS Python, a dev dependency) with
its ``local-completions`` model against a live ``llm-serve`` of the same checkpoint (the
exported folder only gives the tokenizer), so the server's ``echo`` + ``logprobs`` are what
is compared with ``llm-eval``; results go to verify_lm_eval_served.json.

Prints a table and writes JSON (versions included) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

TASK_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
output_type: multiple_choice
validation_split: validation
process_docs: !function harness_hellaswag.process_docs
doc_to_text: "{{{{query}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "choices"
description: "<|bos|>"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The harness's own HellaSwag preprocessing, imported from the installed package.
HARNESS_UTILS = "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"

# Runs inside the lm-eval environment: evaluate, then dump per-item log-likelihoods.
DRIVER = """\
import json, sys
import lm_eval, transformers, torch, datasets
from lm_eval.tasks import TaskManager
hf_dir, task_dir, name, out, batch = sys.argv[1:6]
res = lm_eval.simple_evaluate(
    model="hf", model_args=f"pretrained={hf_dir},dtype=float32",
    tasks=[name], task_manager=TaskManager(include_path=task_dir), num_fewshot=0,
    batch_size=int(batch), log_samples=True, device="cpu")
items = []
for s in sorted(res["samples"][name], key=lambda s: s["doc_id"]):
    items.append({"doc_id": s["doc_id"], "lls": [r[0] for r in s["filtered_resps"]],
                  "acc": s["acc"], "acc_norm": s["acc_norm"]})
versions = {"lm_eval": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "?",
            "transformers": transformers.__version__, "torch": torch.__version__,
            "datasets": datasets.__version__}
json.dump({"results": res["results"][name], "items": items, "versions": versions},
          open(out, "w"), default=str)
"""


def make_task(path: Path, n: int, seed: int) -> None:
    """Write n HellaSwag-format items from sentences of data/pretrain.json."""
    texts = json.loads((ROOT / "data" / "pretrain.json").read_text(encoding="utf-8"))
    rng = random.Random(seed)
    pool = [t.split() for t in texts if 10 <= len(t.split()) <= 40]
    rng.shuffle(pool)
    rows = []
    for i in range(n):
        words = pool[i]
        cut = len(words) // 2
        others = [pool[(i + 1 + 37 * k) % len(pool)] for k in range(3)]
        endings = [" ".join(words[cut:])] + [" ".join(o[len(o) // 2 :]) for o in others]
        order = list(range(4))
        rng.shuffle(order)
        marker = " [title]" if i % 5 == 0 else (" [header]" if i % 7 == 0 else "")
        rows.append({"activity_label": "Story", "ctx_a": " ".join(words[: cut - 2]) + marker,
                     "ctx_b": " ".join(words[cut - 2 : cut]),
                     "endings": [endings[j] for j in order], "label": str(order.index(0)),
                     "split": "val"})  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def harness_served(ckpt: Path, hf_dir: Path, task_dir: Path, name: str, batch: int,
                   context: int) -> dict:  # fmt: skip
    """lm-eval's local-completions against llm-serve (started here, stopped after)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    log = task_dir / "serve.log"
    serve = Path(sys.executable).parent / "llm-serve"
    proc = subprocess.Popen([str(serve), str(ckpt), "--port", "0", "--model-name", "m"],
                            stdout=subprocess.DEVNULL, stderr=open(log, "w"))  # fmt: skip
    try:
        url = None
        for _ in range(3000):
            lines = [x for x in log.read_text().splitlines() if '"event": "listening"' in x]
            if lines:
                url = json.loads(lines[0].partition(": ")[2])["url"]
                break
            if proc.poll() is not None:
                sys.exit(f"llm-serve failed: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        args = (f"model=m,base_url={url}/v1/completions,tokenizer={hf_dir},"
                "tokenizer_backend=huggingface,tokenized_requests=True,"
                f"max_length={context},num_concurrent=1,max_retries=1")  # fmt: skip
        manager = TaskManager(include_path=str(task_dir))
        res = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=[name],
                                      task_manager=manager, num_fewshot=0, batch_size=batch,
                                      log_samples=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(30)
    items = [{"doc_id": x["doc_id"], "lls": [r[0] for r in x["filtered_resps"]], "acc": x["acc"],
              "acc_norm": x["acc_norm"]}
             for x in sorted(res["samples"][name], key=lambda x: x["doc_id"])]  # fmt: skip
    return {"results": res["results"][name], "items": items,
            "versions": {"lm_eval": lm_eval.__version__, "model": "local-completions"}}  # fmt: skip


def run(cmd: list[str], env=None, timeout=3600) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--lm-eval-python",
        default="/work/tmp/lm_eval_venv/bin/python",
        help="python of the separate environment with lm-eval installed",
    )
    ap.add_argument("--ckpt", help="checkpoint to test (default: train a small one)")
    ap.add_argument("--work", default="/work/tmp/verify_lm_eval", help="scratch folder")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--steps", type=int, default=400, help="training steps (no --ckpt)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--served",
        action="store_true",
        help="lm-eval's local-completions against llm-serve (see the docstring)",
    )
    ap.add_argument("--out", default=None, help="default: results/verify_lm_eval[_served].json")
    args = ap.parse_args()
    if args.out is None:
        suffix = "_served" if args.served else ""
        args.out = str(HERE / "results" / f"verify_lm_eval{suffix}.json")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    ckpt = Path(args.ckpt) if args.ckpt else work / "run"
    t0 = time.perf_counter()
    if not args.ckpt:
        run([str(bin_dir / "llm-train"), "--data", str(ROOT / "data" / "pretrain.json"),
             "--out", str(ckpt), "--preset", "seed", "--steps", str(args.steps), "--quiet",
             "--seq-len", "128", "--eval-every", "100"])  # fmt: skip
    task = work / "task" / "hellaswag_local.jsonl"
    task.parent.mkdir(exist_ok=True)
    make_task(task, args.items, seed=0)
    name = "tritonlm_hellaswag_local"
    (task.parent / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=task))
    (task.parent / "harness_hellaswag.py").write_text(HARNESS_UTILS)
    (work / "driver.py").write_text(DRIVER)
    hf_dir = work / "hf"
    run([str(bin_dir / "llm-export"), str(ckpt), str(hf_dir)])
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_CACHE": str(work / "hf_cache"),
           "HF_HOME": str(work / "hf_home")}  # fmt: skip
    harness_json = work / "harness.json"
    t1 = time.perf_counter()
    if args.served:
        from tritonlm.engine.checkpoint.save_load import load_checkpoint

        context = load_checkpoint(ckpt).model.config.max_seq_len
        os.environ.update(env)
        harness = harness_served(ckpt, hf_dir, task.parent, name, args.batch_size, context)
    else:
        run([args.lm_eval_python, str(work / "driver.py"), str(hf_dir), str(task.parent), name,
             str(harness_json), str(args.batch_size)], env=env)  # fmt: skip
        harness = json.loads(harness_json.read_text())
    t_harness = time.perf_counter() - t1

    import torch
    from tritonlm.engine.checkpoint.save_load import load_checkpoint
    from tritonlm.engine.eval.choice import evaluate_choices
    from tritonlm.engine.eval.task_formats import load_task

    c = load_checkpoint(ckpt)
    fmt, items = load_task(task)
    t2 = time.perf_counter()
    ours = evaluate_choices(c.model, c.tokenizer, items, fmt, batch_size=args.batch_size)
    t_ours = time.perf_counter() - t2

    diffs, acc_same, norm_same = [], 0, 0
    for mine, theirs in zip(ours.details, harness["items"], strict=True):
        diffs += [abs(a - b) for a, b in zip(mine["loglikelihoods"], theirs["lls"], strict=True)]
        acc_same += float(mine["pred"] == mine["gold"]) == theirs["acc"]
        norm_same += float(mine["pred_norm"] == mine["gold"]) == theirs["acc_norm"]
    h = harness["results"]
    table = [("acc", ours.acc, h["acc,none"], ours.acc_stderr, h["acc_stderr,none"]),
             ("acc_norm", ours.acc_norm, h["acc_norm,none"], ours.acc_norm_stderr,
              h["acc_norm_stderr,none"])]  # fmt: skip
    print(f"{len(items)} HellaSwag-format items, checkpoint {ckpt}")
    print(f"{'metric':<10}{'ours':>10}{'harness':>10}{'ours se':>10}{'harness se':>12}")
    for name_, a, b, sa, sb in table:
        print(f"{name_:<10}{a:>10.4f}{b:>10.4f}{sa:>10.4f}{float(sb):>12.4f}")
    print(f"items with the same acc: {acc_same}/{len(items)}, same acc_norm: "
          f"{norm_same}/{len(items)}; max |loglik difference|: {max(diffs):.2e} nats "
          f"over {len(diffs)} choices")  # fmt: skip
    print(f"time: ours {t_ours:.1f}s, harness {t_harness:.1f}s (including its startup)")
    record = {
        "items": len(items), "checkpoint": str(ckpt),
        "ours": ours.to_dict(), "harness": h, "harness_versions": harness["versions"],
        "items_same_acc": acc_same, "items_same_acc_norm": norm_same,
        "max_abs_loglik_diff": max(diffs), "choices": len(diffs),
        "seconds": {"ours": t_ours, "harness": t_harness, "total": time.perf_counter() - t0},
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "cpus": os.cpu_count()},
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""lm-evaluation-harness's ``local-completions`` model against a live llm-serve scores a
HellaSwag-format task exactly as llm-eval does on the same checkpoint: the same acc and
acc_norm pick on every item, log-likelihoods equal to float32 rounding."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from chat_fixtures import CHATS, trained_checkpoint
from serve_fixtures import serving
from tritonlm.engine.checkpoint.save_load import load_checkpoint
from tritonlm.engine.eval.choice import evaluate_choices
from tritonlm.engine.eval.task_formats import load_task

LLM_EXPORT = Path(sys.executable).parent / "llm-export"
TASK_YAML = """\
task: tritonlm_served
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
  - metric: acc_norm
metadata:
  version: 1.0
"""


def write_task(folder: Path) -> Path:
    """Six HellaSwag-format items from the memorized chats: one true ending, three others."""
    answers = [a for _, a in CHATS]
    rows = []
    for i, (question, answer) in enumerate(CHATS * 2):
        endings = [answer, *[a for a in answers if a != answer], "the cat sat"][:4]
        order = [(j + i) % 4 for j in range(4)]
        rows.append({"activity_label": "Chat", "ctx_a": question, "ctx_b": "",
                     "endings": [endings[j] for j in order], "label": str(order.index(0)),
                     "split": "val"})  # fmt: skip
    data = folder / "served.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "tritonlm_served.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "harness_hellaswag.py").write_text(
        "from lm_eval.tasks.hellaswag.utils import process_docs  # noqa: F401\n"
    )
    return data


@pytest.mark.slow
def test_local_completions_equals_llm_eval(tmp_path_factory):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    ckpt = trained_checkpoint(tmp_path_factory)
    work = tmp_path_factory.mktemp("lm_eval")
    hf_dir = work / "hf"  # the harness tokenizes with the exported Hugging Face tokenizer
    subprocess.run([str(LLM_EXPORT), str(ckpt), str(hf_dir)], check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    data = write_task(work)
    with serving(ckpt, work, "--max-batch", "8") as srv:
        args = (f"model=ckpt,base_url={srv.url}/v1/completions,tokenizer={hf_dir},"
                "tokenizer_backend=huggingface,tokenized_requests=True,max_length=64,"
                "num_concurrent=1,max_retries=1")  # fmt: skip
        res = simple_evaluate(model="local-completions", model_args=args,
                              tasks=["tritonlm_served"], num_fewshot=0, batch_size=4,
                              task_manager=TaskManager(include_path=str(work)),
                              log_samples=True)  # fmt: skip
    c = load_checkpoint(ckpt)
    fmt, items = load_task(data)
    ours = evaluate_choices(c.model, c.tokenizer, items, fmt, batch_size=8)
    samples = sorted(res["samples"]["tritonlm_served"], key=lambda s: s["doc_id"])
    assert len(samples) == len(ours.details) == 6
    for mine, theirs in zip(ours.details, samples, strict=True):
        lls = [r[0] for r in theirs["filtered_resps"]]
        assert lls == pytest.approx(mine["loglikelihoods"], abs=1e-3)
        assert theirs["acc"] == float(mine["pred"] == mine["gold"])
        assert theirs["acc_norm"] == float(mine["pred_norm"] == mine["gold"])
    h = res["results"]["tritonlm_served"]
    assert h["acc,none"] == pytest.approx(ours.acc)
    assert h["acc_norm,none"] == pytest.approx(ours.acc_norm)

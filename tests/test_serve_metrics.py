"""GET /metrics (Prometheus text format) and the prefix cache behind a live llm-serve:
a chat replayed turn by turn reuses its history, and the counters add up to the usage
the client saw."""

import pytest
from chat_fixtures import trained_checkpoint
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import serving


def scrape(server) -> dict[str, float]:
    r = server.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()) if k != "le")
            if "le" in s.labels:
                continue
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = trained_checkpoint(tmp_path_factory)
    with serving(ckpt, tmp_path_factory.mktemp("serve"), "--prefix-cache-tokens", "512") as s:
        yield s


def test_metrics_count_a_replayed_chat(server):
    client = server.openai()
    history, usage = [], []
    for question in ("what is a token?", "hi", "bye"):
        history.append({"role": "user", "content": question})
        r = client.chat.completions.create(model="ckpt", messages=history, temperature=0,
                                           max_tokens=12)  # fmt: skip
        history.append({"role": "assistant", "content": r.choices[0].message.content})
        usage.append(r.usage)
    bad = server.http.post("/v1/chat/completions", json={"model": "ckpt", "messages": []})
    assert bad.status_code == 400
    m = scrape(server)
    assert sum(v for k, v in m.items() if k.startswith("tritonlm_requests_total{")) == 3
    assert m["tritonlm_prompt_tokens_total"] == sum(u.prompt_tokens for u in usage)
    assert m["tritonlm_completion_tokens_total"] == sum(u.completion_tokens for u in usage)
    assert m["tritonlm_time_to_first_token_seconds_count"] == 3
    assert m["tritonlm_time_to_first_token_seconds_sum"] > 0
    assert m["tritonlm_time_per_output_token_seconds_count"] == 3
    assert m["tritonlm_requests_refused_total{status=400}"] == 1
    assert m["tritonlm_queue_waiting"] == 0 and m["tritonlm_rows_active"] == 0
    # Turns 2 and 3 start with the earlier turns: the cache held them.
    assert m["tritonlm_prefix_cache_lookups_total"] == 3
    assert m["tritonlm_prefix_cache_hits_total"] == 2
    assert m["tritonlm_prefix_cache_hit_tokens_total"] >= usage[0].prompt_tokens * 2
    assert 0 < m["tritonlm_prefix_cache_tokens"] <= 512


def test_models_report_the_context(server):
    card = server.http.get("/v1/models").json()["data"][0]
    assert card["max_model_len"] == card["context_length"] == 64

"""response_format through constrained decoding (xgrammar as a token mask): 200 answers
sampled at temperature 1 from an untrained model all parse and validate against the
schema; a schema keyword the server cannot enforce is a 400 that names it."""

import concurrent.futures
import json

import jsonschema
import pytest
from serve_fixtures import long_checkpoint, serving
from tritonlm.engine.inference.grammar import GrammarError, Grammars, schema_problem
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
        "note": {"anyOf": [{"type": "null"}, {"const": "x"}]},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
MSG = [{"role": "user", "content": "a person, please"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    ckpt = long_checkpoint(tmp_path_factory)
    args = ("--max-batch", "16", "--max-queue", "256", "--prefix-cache-tokens", "0")
    with serving(ckpt, tmp_path_factory.mktemp("json"), *args) as srv:
        yield srv


def test_two_hundred_sampled_answers_validate(server):
    client = server.openai()

    def ask(seed):
        r = client.chat.completions.create(model="long", messages=MSG, temperature=1.0,
                                           seed=seed, max_tokens=200,
                                           response_format=FORMAT)  # fmt: skip
        return r.choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, range(200)))
    docs = []
    for choice in answers:
        assert choice.finish_reason == "stop", choice.message.content
        doc = json.loads(choice.message.content)
        jsonschema.validate(doc, SCHEMA)
        docs.append(doc)
    assert len({json.dumps(d, sort_keys=True) for d in docs}) > 100  # really sampled


def test_json_object_streamed_and_completions(server):
    client = server.openai()
    chunks = client.chat.completions.create(model="long", messages=MSG, temperature=1.0,
                                            seed=3, max_tokens=300, stream=True,
                                            response_format={"type": "json_object"})  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert isinstance(json.loads(text), dict)
    extra = {"response_format": FORMAT}
    r = client.completions.create(model="long", prompt="x", temperature=1.0, seed=5,
                                  max_tokens=200, extra_body=extra)  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMA)


@pytest.mark.parametrize("keyword,schema", [
    ("not", {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}),
    ("oneOf", {"oneOf": [{"type": "string"}, {"type": "integer"}]}),
    ("format", {"type": "string", "format": "email"}),
    ("multipleOf", {"type": "array", "items": {"type": "number", "multipleOf": 3}}),
])  # fmt: skip
def test_unsupported_keyword_is_a_400_naming_it(server, keyword, schema):
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = server.http.post("/v1/chat/completions", json={"model": "long", "messages": MSG,
                                                       "response_format": fmt})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert f"'{keyword}'" in err["message"] and err["code"] == "unsupported_schema"
    assert err["param"] == "response_format.json_schema.schema"


def test_schema_checks_without_http(tmp_path_factory):
    assert schema_problem(SCHEMA) is None
    assert schema_problem({"$defs": {"p": {"uniqueItems": True}}}) == (
        "unsupported JSON schema keyword 'uniqueItems' at schema.$defs.p"
    )
    tok = BpeTokenizer.load(long_checkpoint(tmp_path_factory) / "tokenizer.json")
    grammars = Grammars(tok, tok.vocab_size)
    assert grammars.compile({"type": "text"}) is None
    for bad in ({"type": "yaml"}, {"type": "json_schema"}, {"type": "json_object", "x": 1}):
        with pytest.raises(GrammarError):
            grammars.compile(bad)

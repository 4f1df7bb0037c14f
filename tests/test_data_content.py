"""Malformed data content: every variant is one DataError naming the file (and line).

Also the streaming .json parser: the same items and line numbers as `json.loads` whatever
the chunk size, and memory that does not grow with the file.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from tritonlm.engine.data import json_list
from tritonlm.engine.data.data_files import DataError
from tritonlm.engine.data.json_list import json_list_items
from tritonlm.engine.data.records import load_chats, load_texts

DEEP = 100_000
MSG = {"role": "user", "content": "q"}
ANSWER = {"role": "assistant", "content": "a"}
BOTH = json.dumps({"text": "a", "messages": [MSG, ANSWER]})  # a JSONL line for either loader
CHAT = '"User: q Assistant: a"'  # a JSON list item for either loader


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def one_error(loader, file: Path) -> str:
    with pytest.raises(DataError) as info:
        loader([file])
    msg = str(info.value)
    assert msg.startswith(f"{file}:") and "\n" not in msg
    return msg


# ----------------------------------------------------------------------------- deep nesting

deep_list = "[" * DEEP + "]" * DEEP
deep_object = '{"a":' * DEEP + "1" + "}" * DEEP
DEEP_CASES = {
    "json-deep-list": (".json", "[" + deep_list + "]", 1),
    "json-deep-list-line-3": (".json", "[\n" + CHAT + ",\n" + deep_list + "]", 3),
    "json-deep-object": (".json", "[" + deep_object + "]", 1),
    "json-deep-unclosed": (".json", "[" * DEEP, 1),
    "json-deep-mixed": (".json", "[" + CHAT + ", " + '[{"k":' * (DEEP // 2), 1),
    "jsonl-deep-list": (".jsonl", deep_list + "\n", 1),
    "jsonl-deep-text": (".jsonl", BOTH + '\n{"text": ' + deep_list + "}\n", 2),
    "jsonl-deep-object": (".jsonl", deep_object + "\n", 1),
    "jsonl-deep-unclosed": (".jsonl", BOTH + "\n\n" + "[" * DEEP, 3),
}


@pytest.mark.parametrize("name", sorted(DEEP_CASES))
@pytest.mark.parametrize("loader", [load_texts, load_chats])
def test_deeply_nested_json_is_a_data_error(tmp_path, name, loader):
    ext, content, line = DEEP_CASES[name]
    msg = one_error(loader, write(tmp_path / f"deep{ext}", content))
    assert msg.startswith(f"{tmp_path / f'deep{ext}'}:{line}: ")
    assert "nested too deeply" in msg or "not valid JSON" in msg, msg


def test_deep_top_level_object_is_not_parsed(tmp_path):
    f = write(tmp_path / "o.json", "{" * DEEP)
    assert "expected a JSON list of strings, got an object" in one_error(load_texts, f)


def test_deep_messages_in_chat_jsonl(tmp_path):
    f = write(tmp_path / "c.jsonl", '{"messages": ' + deep_list + "}\n")
    assert one_error(load_chats, f).startswith(f"{f}:1: JSON nested too deeply")


# ----------------------------------------------------------------------------- bytes


def utf16(text: str) -> bytes:
    return text.encode("utf-16")  # with a byte-order mark


# name -> (extension, bytes, line, words in the message)
BAD_BYTES = {
    "latin1-txt": (".txt", b"one\ntwo\nna\xefve\n", 3, "not valid UTF-8 (byte 0xef"),
    "latin1-json": (".json", b'[\n"caf\xe9"]', 2, "not valid UTF-8"),
    "latin1-jsonl": (".jsonl", BOTH.encode() + b'\n{"text": "\xe9"}\n', 2, f"{len(BOTH) + 11}"),
    "latin1-csv": (".csv", b"a,b\n\xff,c\n", 2, "not valid UTF-8"),
    "cut-char-at-end": (".json", b'["caf\xc3', 1, "not valid UTF-8 (byte 0xc3"),
    "cut-char-at-end-txt": (".txt", b"caf\xc3", 1, "not valid UTF-8"),
    "overlong": (".txt", b"a\xc0\xafb", 1, "byte 0xc0"),
    "encoded-surrogate": (".jsonl", b'{"text": "\xed\xa0\x80"}', 1, "byte 0xed"),
    "utf16-bom-json": (".json", utf16('["a"]'), 1, "UTF-16 byte-order mark"),
    "utf16-bom-txt": (".txt", utf16("hello"), 1, "UTF-16"),
    "utf16-bom-jsonl": (".jsonl", utf16('{"text": "a"}\n'), 1, "UTF-16"),
    "utf16-bom-csv": (".csv", utf16("a,b\n"), 1, "UTF-16"),
    "utf16be-bom": (".txt", "hi".encode("utf-16-be").join([b"\xfe\xff", b""]), 1, "UTF-16"),
    "utf32-bom": (".json", '["a"]'.encode("utf-32"), 1, "UTF-16"),
    "utf16-no-bom": (".txt", "hello".encode("utf-16-le"), 1, "NUL byte at offset 1"),
    "nul-txt": (".txt", b"a\nb\x00c", 2, "NUL byte at offset 3"),
    "nul-csv": (".csv", b"a,b\nc,\x00\n", 2, "NUL byte"),
    "nul-jsonl": (".jsonl", BOTH.encode() + b'\n{"text": "\x00"}\n', 2, "NUL byte"),
    "nul-json-in-string": (".json", b'["a",\n"b\x00"]', 2, "NUL byte"),
    "nul-json-outside": (".json", b'["a"]\x00', 1, "NUL byte"),
    "bom-in-the-middle": (".json", b'["a",\xef\xbb\xbf"b"]', 1, "not valid JSON"),
}


@pytest.mark.parametrize("name", sorted(BAD_BYTES))
def test_bad_bytes(tmp_path, name):
    ext, content, line, words = BAD_BYTES[name]
    f = write(tmp_path / f"x{ext}", content)
    msg = one_error(load_texts, f)
    assert msg.startswith(f"{f}:{line}: ") and words in msg, msg
    if ext in (".json", ".jsonl"):
        assert one_error(load_chats, f).startswith(f"{f}:{line}: ")


GOOD = [(".txt", "doc"), (".json", '["doc"]'), (".jsonl", '{"text": "doc"}\n'), (".csv", "doc\n")]


@pytest.mark.parametrize("ext, content", GOOD)
def test_utf8_bom_is_accepted_in_every_format(tmp_path, ext, content):
    f = write(tmp_path / f"b{ext}", b"\xef\xbb\xbf" + content.encode())
    assert load_texts([f]).items == ["doc"]


# ----------------------------------------------------------------------------- JSON structure

# .json content -> (line, words); texts and chats both refuse all of them
BAD_JSON = {
    "": (1, "not valid JSON (Expecting value)"),
    "   \n\n ": (3, "not valid JSON (Expecting value)"),
    "{}": (1, "got an object"),
    '{"text": "a"}': (1, "got an object"),
    '"just a string"': (1, "got a string"),
    "42": (1, "got a number"),
    "-1.5e3": (1, "got a number"),
    "true": (1, "got a boolean"),
    "false": (1, "got a boolean"),
    "null": (1, "got null"),
    "\n\n{}": (3, "got an object"),
    "x": (1, "not valid JSON (Expecting value)"),
    "[": (1, "not valid JSON (Expecting value)"),
    '["a"': (1, "Expecting ',' delimiter"),
    '["a",': (1, "not valid JSON (Expecting value)"),
    '["a",]': (1, "not valid JSON (Expecting value)"),
    "[,]": (1, "not valid JSON (Expecting value)"),
    '["a",,"b"]': (1, "not valid JSON (Expecting value)"),
    '["a" "b"]': (1, "Expecting ',' delimiter"),
    '["a"\n\n"b"]': (3, "Expecting ',' delimiter"),
    '["a"] ["b"]': (1, "Extra data"),
    '["a"]\n\nx': (3, "Extra data"),
    '["a"],': (1, "Extra data"),
    '["a': (1, "Unterminated string"),
    '["a\tb"]': (1, "Invalid control character"),
    '["a\nb"]': (1, "Invalid control character"),
    '["\\x"]': (1, "Invalid \\escape"),
    '["\\u12"]': (1, "Invalid \\uXXXX escape"),
    "['a']": (1, "not valid JSON"),
    "[1, 2]": (1, "list item is a number"),
    '["a",\n1.5]': (2, "list item is a number"),
    '["a",\n\n-0]': (3, "list item is a number"),
    "[1e999]": (1, "list item is a number"),
    "[NaN]": (1, "list item is a number"),
    "[Infinity]": (1, "list item is a number"),
    "[-Infinity]": (1, "list item is a number"),
    "[null]": (1, "list item is null"),
    "[true]": (1, "list item is a boolean"),
    "[[]]": (1, "list item is a list"),
    '[["nested", "strings"]]': (1, "list item is a list"),
    '[{"text": "a"}]': (1, "list item is an object"),
    "[" + "9" * 5000 + "]": (1, "not valid JSON (Exceeds the limit"),
    '["\\ud800"]': (1, "unpaired surrogate"),
    '["ok \\udfff"]': (1, "unpaired surrogate"),
}


@pytest.mark.parametrize("content", list(BAD_JSON), ids=range(len(BAD_JSON)))
@pytest.mark.parametrize("loader", [load_texts, load_chats])
def test_malformed_json_list(tmp_path, content, loader):
    line, words = BAD_JSON[content]
    if loader is load_chats:  # the same structure, with items that are chats
        content = content.replace('"a"', '"User: q Assistant: a"').replace('"b"', '"User: b"')
        content = content.replace('["ok ', '["User: q Assistant: ').replace('["\\u', '["User: \\u')
    f = write(tmp_path / "x.json", content)
    msg = one_error(loader, f)
    assert msg.startswith(f"{f}:{line}: ") and words in msg, msg


# .jsonl content -> (line, words) for texts
BAD_JSONL = {
    '{"text": 1}': (1, 'string "text"'),
    '{"text": null}': (1, 'string "text"'),
    '{"text": ["a"]}': (1, 'string "text"'),
    '{"text": {"t": "a"}}': (1, 'string "text"'),
    '{"text": true}': (1, 'string "text"'),
    '{"body": "a"}': (1, 'string "text"'),
    '"a string"': (1, 'string "text"'),
    "42": (1, 'string "text"'),
    "null": (1, 'string "text"'),
    '["a"]': (1, 'string "text"'),
    '{"text": "a"} {"text": "b"}': (1, "Extra data"),
    '{"text": "a"},': (1, "Extra data"),
    '{"text": "a"': (1, "Expecting ',' delimiter"),
    '{"text": "a"}\n{"text": "b\\ud800"}': (2, "unpaired surrogate"),
    '{"text": ' + "1" * 5000 + "}": (1, "Exceeds the limit"),
    '{"text": "a"}\n\n\n{text: "b"}': (4, "Expecting property name"),
}


@pytest.mark.parametrize("content", list(BAD_JSONL), ids=range(len(BAD_JSONL)))
def test_malformed_jsonl_texts(tmp_path, content):
    line, words = BAD_JSONL[content]
    f = write(tmp_path / "x.jsonl", content + "\n")
    msg = one_error(load_texts, f)
    assert msg.startswith(f"{f}:{line}: ") and words in msg, msg


BAD_CHATS = {
    "messages-string": ({"messages": "hi"}, "non-empty list"),
    "messages-null": ({"messages": None}, "non-empty list"),
    "messages-object": ({"messages": {"role": "user"}}, "non-empty list"),
    "messages-empty": ({"messages": []}, "non-empty list"),
    "no-messages": ({"text": "hi"}, '"messages" list'),
    "message-string": ({"messages": ["hi", ANSWER]}, "expected an object"),
    "message-list": ({"messages": [["user", "q"], ANSWER]}, "expected an object"),
    "content-null": ({"messages": [{"role": "user", "content": None}, ANSWER]}, "null"),
    "content-number": ({"messages": [{"role": "user", "content": 1}, ANSWER]}, "a number"),
    "content-list": ({"messages": [{"role": "user", "content": ["q"]}, ANSWER]}, "a list"),
    "role-list": ({"messages": [{"role": ["user"], "content": "q"}, ANSWER]}, "unknown role"),
    "role-missing": ({"messages": [{"content": "q"}, ANSWER]}, "unknown role None"),
    "content-surrogate": ({"messages": [{"role": "user", "content": "\ud800"}, ANSWER]}, "surr"),
    "no-assistant": ({"messages": [MSG]}, "no assistant turn"),
}


@pytest.mark.parametrize("name", sorted(BAD_CHATS))
def test_malformed_chat_records(tmp_path, name):
    record, words = BAD_CHATS[name]
    good = json.dumps({"messages": [MSG, ANSWER]})
    f = write(tmp_path / "c.jsonl", good + "\n\n" + json.dumps(record) + "\n")
    msg = one_error(load_chats, f)
    assert msg.startswith(f"{f}:3: ") and words in msg, msg


def test_csv_quoting_is_strict(tmp_path):
    f = write(tmp_path / "q.csv", 'ok,row\nnext,"unclosed\nrest,of,the,file\n')
    assert one_error(load_texts, f).startswith(f"{f}:2: bad CSV row")
    g = write(tmp_path / "r.csv", 'a,"b"c,d\n')
    assert "bad CSV row" in one_error(load_texts, g)


def test_crlf_line_endings_and_valid_escapes(tmp_path):
    f = write(tmp_path / "a.json", '[\r\n"x",\r\n"\\ud83d\\ude00 \\u00e9"\r\n]\r\n')
    assert load_texts([f]).items == ["x", "\U0001f600 \u00e9"]
    g = write(tmp_path / "b.jsonl", '{"text": "y"}\r\n\r\n{"text": "z"}\r\n')
    result = load_texts([g])
    assert result.items == ["y", "z"] and result.skipped == {"blank line": 1}
    h = write(tmp_path / "c.json", '[\r\n"a",\r\n3]')
    assert one_error(load_texts, h).startswith(f"{h}:3: list item is a number")


@pytest.mark.parametrize("ext", [".json", ".jsonl", ".txt", ".csv"])
def test_huge_single_line(tmp_path, ext):
    big = "w" * 3_000_000 + " \u00e9 " + "z" * 1000
    content = {".json": json.dumps([big, "b"], ensure_ascii=False),
               ".jsonl": json.dumps({"text": big}) + "\n", ".txt": big,
               ".csv": big[:100_000] + "\n"}[ext]  # fmt: skip
    f = write(tmp_path / f"h{ext}", content)
    want = {".json": [big, "b"], ".csv": [big[:100_000]]}.get(ext, [big])
    assert load_texts([f]).items == want


# ----------------------------------------------------------------------------- streaming

DOCS = [
    "[]",
    " [ ] ",
    '["a"]',
    '\n\n[\n  "a",\n\n  "b"  ,"c"\n]\n\n',
    json.dumps(["caf\u00e9 \u2603 \U0001f600 " * 5, "x" * 50, "", "  "], ensure_ascii=False),
    json.dumps(["\\", '"', "\\u0041", "\t\n", "</script>"] * 3),
    json.dumps([str(i) * (i % 7) for i in range(60)], indent=2),
    '[1, -2.5e-3, 1E+2, true, false, null, {"a": [1, {"b": "c"}]}, [[]], "s", -0, 123456]',
    "[-Infinity, Infinity, NaN, 12345678901234567890]",
]
BAD_DOCS = ['["a" "b"]', '["a",]', '[\n"a",\n\n"b"\n"c"]', '["abc', "[1, 2", '["a"] x',
            '["\\u12x"]', '["a",\n  tru]', "[" + '"x", ' * 40 + "-Infinit]"]  # fmt: skip


def reference_lines(doc: str) -> list[int]:
    """The line each item starts on, found independently: re-parse with a marker scan."""
    decoder, lines, pos = json.JSONDecoder(), [], doc.index("[") + 1
    items = json.loads(doc)
    for _ in items:
        while doc[pos] in " \t\r\n,":
            pos += 1
        lines.append(doc.count("\n", 0, pos) + 1)
        pos = decoder.raw_decode(doc, pos)[1]
    return lines


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 1 << 20])
def test_stream_matches_json_loads_at_any_chunk_size(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(json_list, "CHUNK_CHARS", chunk)
    for i, doc in enumerate(DOCS):
        f = write(tmp_path / f"d{i}.json", doc)
        got = list(json_list_items(f))
        assert json.dumps([v for _, v in got]) == json.dumps(json.loads(doc)), doc  # NaN-safe
        assert [line for line, _ in got] == reference_lines(doc), doc
    for i, doc in enumerate(BAD_DOCS):
        f = write(tmp_path / f"bad{i}.json", doc)
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(doc)
        with pytest.raises(DataError) as got:
            list(json_list_items(f))
        assert str(got.value) == f"{f}:{ref.value.lineno}: not valid JSON ({ref.value.msg})"


def test_file_much_larger_than_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr(json_list, "CHUNK_CHARS", 4096)
    items = [f"item {i} " + "\u00e9" * (i % 13) + "x" * (i % 5000) for i in range(3000)]
    f = write(tmp_path / "big.json", json.dumps(items, ensure_ascii=bool(0), indent=1))
    assert f.stat().st_size > 1000 * 4096
    result = load_texts([f])
    assert result.items == items and result.skipped == {}


MEMORY_CHILD = textwrap.dedent("""
    import resource, sys
    from tritonlm.engine.data.records import load_texts
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = load_texts([sys.argv[1]])
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(len(result.items), result.skipped["empty text"], (after - before) * 1024)
""")


def test_memory_does_not_grow_with_the_file(tmp_path):
    """40 MB of whitespace-only items (skipped, so nothing is kept) plus one real item: the
    peak memory must stay well under the file size (reading it whole would need 3x)."""
    f = tmp_path / "spaces.json"
    with f.open("w") as fh:
        fh.write("[" + ", ".join(['"' + " " * 1000 + '"'] * 40_000) + ', "real"]')
    size = f.stat().st_size
    proc = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(f)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    kept, skipped, grown = map(int, proc.stdout.split())
    assert (kept, skipped) == (1, 40_000)
    assert grown < size / 2, f"peak memory grew by {grown} bytes for a {size}-byte file"

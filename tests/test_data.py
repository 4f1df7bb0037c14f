"""Tests for engine/data.py and the bundled data/ files."""

import importlib.util
import json
from pathlib import Path

import pytest
from tritonlm.engine.data.data_files import DataError
from tritonlm.engine.data.records import (
    LoadResult,
    check_chat,
    load_chats,
    load_texts,
    parse_flat_chat,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"


def write(path: Path, content) -> Path:
    """Write str or bytes to `path` (creating folders) and return it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def error_of(fn, *args) -> str:
    with pytest.raises(DataError) as info:
        fn(*args)
    return str(info.value)


# ----------------------------------------------------------------------------- text formats


def test_txt_file_is_one_document(tmp_path):
    f = write(tmp_path / "a.txt", "First paragraph.\n\nSecond paragraph.\n")
    result = load_texts(f)  # a single path (not a list) is accepted too
    assert isinstance(result, LoadResult)
    assert result.items == ["First paragraph.\n\nSecond paragraph.\n"]
    assert result.skipped == {}
    assert result.sources == [str(f)]


def test_json_list_of_strings(tmp_path):
    f = write(tmp_path / "a.json", json.dumps(["one", "two", "caf\u00e9 \u2603"]))
    assert load_texts([f]).items == ["one", "two", "caf\u00e9 \u2603"]


def test_utf8_bom_is_dropped(tmp_path):
    f = write(tmp_path / "a.json", b"\xef\xbb\xbf" + json.dumps(["x"]).encode())
    assert load_texts([f]).items == ["x"]


def test_jsonl_text_records(tmp_path):
    lines = ['{"text": "alpha"}', "", '{"text": "beta", "id": 7}', '{"text": "  "}']
    f = write(tmp_path / "a.jsonl", "\n".join(lines) + "\n")
    result = load_texts([f])
    assert result.items == ["alpha", "beta"]
    assert result.skipped == {"blank line": 1, "empty text": 1}


def test_csv_rows_joined_with_space(tmp_path):
    content = 'hello,world\n"a, b",c\n\n x ,, y \n,,\n'
    f = write(tmp_path / "a.csv", content)
    result = load_texts([f])
    assert result.items == ["hello world", "a, b c", "x y"]
    assert result.skipped == {"empty row": 2}


def test_csv_multiline_cell_kept(tmp_path):
    f = write(tmp_path / "a.csv", 'one,"two\nlines"\nthree\n')
    assert load_texts([f]).items == ["one two\nlines", "three"]


def test_folder_is_recursive_and_sorted(tmp_path):
    write(tmp_path / "b.txt", "B")
    write(tmp_path / "a" / "z.json", json.dumps(["AZ1", "AZ2"]))
    write(tmp_path / "a" / "b" / "deep.jsonl", '{"text": "ABdeep"}\n')
    write(tmp_path / "c.csv", "C1,C2\n")
    write(tmp_path / "notes.md", "markdown is plain text")
    write(tmp_path / "photo.png", "ignored but counted")
    result = load_texts([tmp_path])
    assert result.items == ["ABdeep", "AZ1", "AZ2", "B", "C1 C2", "markdown is plain text"]
    names = ["deep.jsonl", "z.json", "b.txt", "c.csv", "notes.md"]
    assert [Path(s).name for s in result.sources] == names
    assert result.skipped == {"file with unsupported extension in folder": 1}


def test_several_paths_keep_their_order(tmp_path):
    a = write(tmp_path / "a.json", '["from a"]')
    b = write(tmp_path / "b.txt", "from b")
    assert load_texts([b, a]).items == ["from b", "from a"]


def test_empty_items_are_skipped_and_counted(tmp_path):
    f = write(tmp_path / "a.json", json.dumps(["ok", "", "   \n", "fine"]))
    e = write(tmp_path / "e.txt", "\n\n")
    result = load_texts([f, e])
    assert result.items == ["ok", "fine"]
    assert result.skipped == {"empty text": 3}


# ----------------------------------------------------------------------------- text errors


def test_invalid_json_names_file_and_line(tmp_path):
    f = write(tmp_path / "bad.json", '[\n "a",\n "b"\n "c"\n]')
    assert error_of(load_texts, [f]).startswith(f"{f}:4: not valid JSON")


def test_json_not_a_list(tmp_path):
    f = write(tmp_path / "obj.json", '{"text": "a"}')
    msg = error_of(load_texts, [f])
    assert msg.startswith(f"{f}:1:") and "list" in msg and "an object" in msg


def test_non_string_item_names_its_line(tmp_path):
    f = write(tmp_path / "mixed.json", '[\n  "a",\n  "b",\n\n  {"x": [1,\n 2]},\n  "c"\n]')
    msg = error_of(load_texts, [f])
    assert msg.startswith(f"{f}:5:") and "an object" in msg


def test_non_string_number_item(tmp_path):
    f = write(tmp_path / "n.json", '["a", 3]')
    assert error_of(load_texts, [f]).startswith(f"{f}:1: list item is a number")


def test_invalid_utf8_names_file_and_line(tmp_path):
    f = write(tmp_path / "latin.txt", b"line one\nline two\nna\xefve\n")
    msg = error_of(load_texts, [f])
    assert msg.startswith(f"{f}:3: not valid UTF-8") and "0xef" in msg


def test_invalid_utf8_in_csv(tmp_path):
    f = write(tmp_path / "x.csv", b"ok,row\n\xff\xfe,bad\n")
    assert error_of(load_texts, [f]).startswith(f"{f}:2: not valid UTF-8")


def test_bad_csv_row_names_its_line(tmp_path):
    f = write(tmp_path / "big.csv", 'a\n"b\nc"\nd,' + "x" * 200_000 + "\n")
    msg = error_of(load_texts, [f])
    assert msg.startswith(f"{f}:4: bad CSV row") and "field larger" in msg


def test_jsonl_errors_name_the_line(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "a"}\n{"text": \n')
    assert error_of(load_texts, [bad]).startswith(f"{bad}:2: not valid JSON")
    wrong = write(tmp_path / "wrong.jsonl", '{"text": "a"}\n\n{"body": "b"}\n')
    assert error_of(load_texts, [wrong]).startswith(
        f'{wrong}:3: expected an object with a string "text"'
    )
    num = write(tmp_path / "num.jsonl", '{"text": 5}\n')
    assert error_of(load_texts, [num]).startswith(f"{num}:1:")


def test_missing_file_and_unknown_extension(tmp_path):
    missing = tmp_path / "nope.json"
    assert error_of(load_texts, [missing]).startswith(f"{missing}: no such file")
    odd = write(tmp_path / "data.xlsx", "x")
    msg = error_of(load_texts, [odd])
    assert msg.startswith(f"{odd}: unsupported file type '.xlsx'") and ".jsonl" in msg


def test_empty_dataset_is_an_error(tmp_path):
    f = write(tmp_path / "empty.json", "[]")
    g = write(tmp_path / "blank.json", '["", " "]')
    msg = error_of(load_texts, [f, g])
    assert str(f) in msg and str(g) in msg and "no usable texts" in msg and "2 empty text" in msg
    (tmp_path / "emptydir").mkdir()
    assert "no usable texts" in error_of(load_texts, [tmp_path / "emptydir"])
    assert "no input paths" in error_of(load_texts, [])


# ----------------------------------------------------------------------------- chats


def test_parse_flat_chat_single_turn():
    assert parse_flat_chat("User: What is a tokenizer? Assistant: It splits text.") == [
        {"role": "user", "content": "What is a tokenizer?"},
        {"role": "assistant", "content": "It splits text."},
    ]


def test_parse_flat_chat_multi_turn_with_system():
    text = "  System: Be brief.\nUser: Hi!  Assistant: Hello.\nUser: 2+2? Assistant: 4."
    assert parse_flat_chat(text) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4."},
    ]


def test_parse_flat_chat_markers_need_whitespace_before():
    msgs = parse_flat_chat("User: Say XUser: and Assistant:x Assistant: ok")
    assert msgs == [
        {"role": "user", "content": "Say XUser: and"},
        {"role": "assistant", "content": "x"},
        {"role": "assistant", "content": "ok"},
    ]


def test_parse_flat_chat_must_start_with_marker():
    with pytest.raises(DataError, match="must start with"):
        parse_flat_chat("Hello there. Assistant: hi")
    with pytest.raises(DataError):
        parse_flat_chat("no markers at all")


@pytest.mark.parametrize(
    "messages, needle",
    [
        ([{"role": "user", "content": "hi"}], "no assistant turn"),
        ([{"role": "robot", "content": "hi"}], "unknown role 'robot'"),
        ([{"role": "user", "content": " "}, {"role": "assistant", "content": "x"}], "empty"),
        ([{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}], "a number"),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "b"},
                {"role": "assistant", "content": "c"},
            ],
            "only come first",
        ),
        ([], "non-empty list"),
        ("User: a", "non-empty list"),
        (["hi"], "expected an object"),
    ],
)
def test_check_chat_rejects(messages, needle):
    with pytest.raises(DataError, match=needle):
        check_chat(messages)


def test_check_chat_keeps_only_role_and_content():
    msgs = [{"role": "user", "content": "a", "name": "x"}, {"role": "assistant", "content": "b"}]
    assert check_chat(msgs) == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
    ]


def test_load_chats_json_flat_strings(tmp_path):
    items = ["User: a Assistant: b", "", "System: s User: c Assistant: d User: e Assistant: f"]
    f = write(tmp_path / "chat.json", json.dumps(items, indent=1))
    result = load_chats([f])
    assert result.skipped == {"empty chat": 1}
    assert [[m["role"] for m in c] for c in result.items] == [
        ["user", "assistant"],
        ["system", "user", "assistant", "user", "assistant"],
    ]
    assert result.items[1][4] == {"role": "assistant", "content": "f"}


def test_load_chats_jsonl_messages(tmp_path):
    rec = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = write(tmp_path / "chat.jsonl", json.dumps(rec) + "\n\n" + json.dumps(rec) + "\n")
    result = load_chats([f])
    assert result.items == [rec["messages"], rec["messages"]]
    assert result.skipped == {"blank line": 1}


def test_chat_without_assistant_names_file_and_line(tmp_path):
    f = write(
        tmp_path / "c.json", json.dumps(["User: a Assistant: b", "User: only a question"], indent=1)
    )
    msg = error_of(load_chats, [f])
    assert msg.startswith(f"{f}:3:") and "no assistant turn" in msg
    rec = {"messages": [{"role": "user", "content": "q"}]}
    g = write(
        tmp_path / "c.jsonl",
        '{"messages": [{"role": "assistant", "content": "x"}]}\n' + json.dumps(rec),
    )
    msg = error_of(load_chats, [g])
    assert msg.startswith(f"{g}:2:") and "no assistant turn" in msg


def test_chat_errors_name_file_and_line(tmp_path):
    role = {"messages": [{"role": "wizard", "content": "q"}, {"role": "assistant", "content": "a"}]}
    f = write(tmp_path / "r.jsonl", json.dumps(role) + "\n")
    assert error_of(load_chats, [f]).startswith(f"{f}:1: message 0 has unknown role 'wizard'")
    g = write(tmp_path / "n.jsonl", '{"text": "not a chat"}\n')
    assert error_of(load_chats, [g]).startswith(f'{g}:1: expected an object with a "messages"')
    h = write(tmp_path / "s.json", '[\n"User: a Assistant: b",\n["User: x"]\n]')
    assert error_of(load_chats, [h]).startswith(f"{h}:3: list item is a list")
    i = write(tmp_path / "p.json", '["Hello Assistant: b"]')
    assert error_of(load_chats, [i]).startswith(f"{i}:1: chat text must start with")
    t = write(tmp_path / "t.txt", "User: a Assistant: b")
    assert "unsupported file type '.txt'" in error_of(load_chats, [t])
    e = write(tmp_path / "e.json", '["  "]')
    assert "no usable chats" in error_of(load_chats, [e])


# ----------------------------------------------------------------------------- bundled data


def test_bundled_pretrain_corpus_loads():
    result = load_texts([DATA / "pretrain.json"])
    assert result.skipped == {}
    size = (DATA / "pretrain.json").stat().st_size
    assert 300_000 <= size <= 600_000
    assert len(result.items) >= 1000
    assert len(set(result.items)) == len(result.items)
    assert all(t.isascii() and t == t.strip() for t in result.items)


def test_bundled_chat_set_loads():
    result = load_chats([DATA / "chat.json"])
    assert result.skipped == {}
    size = (DATA / "chat.json").stat().st_size
    assert 100_000 <= size <= 300_000
    assert 500 <= len(result.items) <= 2000
    first = result.items[0]
    assert first[0] == {"role": "user", "content": "What is a tokenizer?"}
    assert "splits text" in first[1]["content"] and "tokens" in first[1]["content"]
    assert any(c[0]["role"] == "system" for c in result.items)
    assert any(len(c) >= 4 for c in result.items)


def test_generator_reproduces_bundled_files_byte_identically():
    spec = importlib.util.spec_from_file_location("make_data", DATA / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    assert sorted(built) == ["chat.json", "pretrain.json"]
    for name, data in built.items():
        assert data == (DATA / name).read_bytes(), f"data/{name} differs from make_data.py output"


def test_hidden_files_and_folders_in_a_corpus_are_not_data(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("real text")
    (tmp_path / ".cache" / "pretrain-1").mkdir(parents=True)
    (tmp_path / ".cache" / "pretrain-1" / "meta.json").write_text('{"not": "a list"}')
    (tmp_path / "docs" / ".notes.txt").write_text("private")
    result = load_texts(tmp_path)
    assert result.items == ["real text"] and result.skipped == {}

"""The parallel token-cache build and tokenizer training on a streamed corpus.

The cache must be byte-identical for any number of workers and either encoding engine;
tiktoken running our merges must give our ids; a build that dies leaves nothing trusted;
pre-token counting must give the same tokenizer for any number of workers.
"""

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from tritonlm.cli import train as cli
from tritonlm.cli import train_flags
from tritonlm.engine import worker_pool
from tritonlm.engine.data import token_cache as tc
from tritonlm.engine.data.corpus import open_corpus
from tritonlm.engine.tokenizer import parallel_encode, pretoken_count
from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import BpeTokenizerConfig

DATA = json.loads(open("data/pretrain.json", encoding="utf-8").read())
ODD = ["  leading spaces\n\n\n\ttabs\r\n", "x" * 3000, "ééé 中文中文 🙂🙂 ١٢٣٤٥ 12345678",
       "don't WE'LL they're\u00a0nbsp", "a\u0301 combining, Ω ohm", " " * 50 + "end",
       "\n"]  # fmt: skip


@pytest.fixture(scope="module")
def tok():
    return BpeTokenizer.train(DATA[:400], BpeTokenizerConfig(vocab_size=700))


@pytest.fixture
def corpus_dir(tmp_path):
    tmp_path = tmp_path / "corpus"
    tmp_path.mkdir()
    pq.write_table(pa.table({"text": DATA[:700] + ODD}), tmp_path / "a.parquet",
                   row_group_size=100)  # fmt: skip
    lines = "".join(json.dumps({"text": t}) + "\n" for t in DATA[700:1400]).encode()
    (tmp_path / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (tmp_path / "c.md").write_text("# Notes\n\n" + "\n".join(DATA[1400:1500]))
    return tmp_path


def files(cache) -> dict:
    """Every file of an entry; meta.json without the engine (it records which one ran)."""
    out = {p.name: p.read_bytes() for p in sorted(cache.path.iterdir())}
    meta = json.loads(out.pop("meta.json"))
    return out | {"meta": {k: v for k, v in meta.items() if k != "engine"}}


def test_tiktoken_engine_gives_our_ids(tok):
    name, fast = parallel_encode.make_encoder(tok, "tiktoken")
    assert name == "tiktoken"
    for text in [*ODD, *DATA[:200], "".join(ODD) * 3]:
        assert fast(text) == tok.encode(text), text[:40]
    ours = parallel_encode.make_encoder(tok, "tritonlm")
    assert ours[0] == "tritonlm"
    with pytest.raises(parallel_encode.EncodeError, match="unknown encoding engine"):
        parallel_encode.make_encoder(tok, "fast")


def test_cache_is_the_same_bytes_for_any_workers_and_engine(tok, corpus_dir, tmp_path,
                                                            monkeypatch):  # fmt: skip
    monkeypatch.setattr(tc, "CHUNK_TOKENS", 20_000)  # many batches across the workers
    corpus = open_corpus(corpus_dir)
    docs = list(corpus.documents())
    one = tc.build_corpus_cache(corpus, tok, tmp_path / "one", workers=1, engine="tritonlm")
    seen = []
    two = tc.build_corpus_cache(corpus, tok, tmp_path / "two", workers=2,
                                progress=lambda d, t: seen.append((d, t)))  # fmt: skip
    assert one.info["engine"] == "tritonlm" and two.info["engine"] == "tiktoken"
    assert one.key == two.key and files(one) == files(two)
    assert one.n_docs == len(docs) and one.n_bytes == sum(len(d.encode()) for d in docs)
    for i in (0, 705, one.n_docs - 1):
        ids = one.tokens[one.doc_offsets[i] : one.doc_offsets[i + 1]].tolist()
        assert ids == [tok.bos_id, *tok.encode(docs[i]), tok.eos_id]
    total = corpus.total_bytes()
    assert seen[-1] == (total, total) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert two.info["summary"] == "1407 documents from 3 files (skipped: 1 empty text)"


def test_unchanged_corpus_is_found_again_and_a_change_is_seen(tok, corpus_dir, tmp_path):
    corpus = open_corpus(corpus_dir)
    first = tc.build_corpus_cache(corpus, tok, tmp_path / "c")
    mtime = (first.path / "tokens.bin").stat().st_mtime_ns
    again = tc.build_corpus_cache(open_corpus(corpus_dir), tok, tmp_path / "c")
    assert again.path == first.path and (again.path / "tokens.bin").stat().st_mtime_ns == mtime
    (corpus_dir / "c.md").write_text("# Notes, edited\n")
    changed = tc.build_corpus_cache(open_corpus(corpus_dir), tok, tmp_path / "c")
    assert changed.key != first.key and changed.n_docs == first.n_docs


def test_a_build_that_dies_leaves_nothing_trusted(tok, corpus_dir, tmp_path, monkeypatch):
    corpus = open_corpus(corpus_dir)
    cache_dir = tmp_path / "cache"
    real, calls = parallel_encode.encode_batch, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the build
        return real(*a, **k)

    monkeypatch.setattr(tc, "CHUNK_TOKENS", 20_000)
    monkeypatch.setattr(parallel_encode, "encode_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        tc.build_corpus_cache(corpus, tok, cache_dir, workers=1)
    assert [p.name for p in cache_dir.iterdir()] == ["file_hashes.json"]
    monkeypatch.setattr(parallel_encode, "encode_batch", real)
    built = tc.build_corpus_cache(corpus, tok, cache_dir, workers=1)
    dead = cache_dir / f".{built.path.name}.tmp-dead"  # a SIGKILLed build's leftovers
    dead.mkdir()
    (built.path / "meta.json").unlink()  # an entry without meta.json is never trusted
    rebuilt = tc.build_corpus_cache(corpus, tok, cache_dir, workers=1)
    assert rebuilt.n_tokens == built.n_tokens and not dead.exists()


def test_pretoken_counts_and_tokenizer_are_the_same_for_any_workers(corpus_dir, monkeypatch):
    monkeypatch.setattr(worker_pool, "BATCH_CHARS", 20_000)  # many batches: a real pool
    corpus = open_corpus(corpus_dir)
    cfg = BpeTokenizerConfig(vocab_size=600)
    one = BpeTokenizer.train(corpus.sample(10**9), cfg, workers=1)
    seen = []
    two = BpeTokenizer.train(corpus.sample(10**9), cfg, workers=2,
                             count_progress=lambda d, t: seen.append(d))  # fmt: skip
    assert one.to_json() == two.to_json()
    assert seen and seen == sorted(seen)
    assert one.to_json() == BpeTokenizer.train(list(corpus.documents()), cfg).to_json()
    # a cap on distinct pre-tokens prunes the same way whatever the number of workers
    capped = [pretoken_count.count_pretokens(corpus.documents(), "nfc",
                                             cfg.pattern, w, max_pieces=300)
              for w in (1, 2)]  # fmt: skip
    assert capped[0] == capped[1] and 0 < len(capped[0]) <= 300


def test_prune_drops_the_rarest_first():
    c = Counter(a=5, b=1, c=1, d=3, e=2)
    assert pretoken_count.prune(c, 3) == Counter(a=5, d=3, e=2)
    assert pretoken_count.prune(c, 2) == Counter(a=5)  # 2 drops b, c; 4 drops d, e
    assert pretoken_count.prune(c, 10) == c


def test_llm_train_on_a_parquet_corpus_with_workers(corpus_dir, tmp_path, capsys):
    (corpus_dir / "c.md").unlink()
    argv = ["--data", str(corpus_dir / "*.parquet"), str(corpus_dir / "b.jsonl.zst"),
            "--workers", "2", "--tokenizer-sample-bytes", "50K", "--out", str(tmp_path / "run"),
            "--d-model", "32", "--n-layers", "1", "--n-heads", "2", "--d-ff", "64",
            "--seq-len", "16", "--vocab-size", "300", "--batch-size", "4", "--threads", "1",
            "--device", "cpu", "--steps", "2"]  # fmt: skip
    assert cli.main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "data: 1406 documents from 2 files (skipped: 1 empty text)" in out
    meta = json.loads(next((tmp_path / ".cache").glob("pretrain-*/meta.json")).read_text())
    assert meta["engine"] == "tiktoken" and meta["n_docs"] == 1406
    assert cli.main([*argv[:-2], "--text-field", "body", "--steps", "2"]) == 2
    assert "no column 'body'" in capsys.readouterr().err


def test_encode_batch_layout():
    def enc(t):
        return [ord(c) for c in t]

    toks, lengths, nbytes = parallel_encode.encode_batch(["ab", "é"], enc, 1, 2, np.uint16)
    assert toks.tolist() == [1, 97, 98, 2, 1, 233, 2] and toks.dtype == np.uint16
    assert lengths.tolist() == [4, 3] and nbytes.tolist() == [2, 2]


def test_ctrl_c_in_a_pooled_build_leaves_no_entry(tok, corpus_dir, tmp_path, monkeypatch):
    corpus = open_corpus(corpus_dir)
    real = corpus.documents

    def interrupted(found=None):
        for i, doc in enumerate(real(found)):
            if i == 900:
                raise KeyboardInterrupt
            yield doc

    monkeypatch.setattr(tc, "CHUNK_TOKENS", 20_000)
    monkeypatch.setattr(corpus, "documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tc.build_corpus_cache(corpus, tok, tmp_path / "c", workers=2)
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["file_hashes.json"]


def test_extension_flag():
    def exts(*argv):
        return train_flags.build_parser().parse_args(list(argv)).text_ext

    assert exts("--text-ext", ".md, .py,") == exts("--text-ext", ".md", "--text-ext", ".py")
    assert exts("--text-ext", ".md, .py,") == [".md", ".py"] and exts("--text-ext", "") == []


def test_byte_bar_plain_lines_only_for_long_phases(monkeypatch):
    import io

    from tritonlm.cli import byte_progress

    out = io.StringIO()
    bar = byte_progress.ByteBar("tokenizing", file=out, interval=10.0)
    bar(1 << 20, 4 << 20)
    bar.close()
    assert out.getvalue() == ""  # a short phase: nothing in a log
    clock = iter([0.0, 20.0, 21.0])
    monkeypatch.setattr(byte_progress.time, "monotonic", lambda: next(clock))
    bar = byte_progress.ByteBar("tokenizing", file=out, interval=10.0)
    bar(2 << 20, 4 << 20)
    bar.close()
    first, last = out.getvalue().splitlines()
    assert first.startswith("tokenizing: 2.0 MiB, 0.1 MiB/s, 50% of 4.0 MiB, eta 20s")
    assert last.startswith("tokenizing: 2.0 MiB")

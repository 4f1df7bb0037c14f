"""A pretraining corpus read as a stream: never in memory whole, read as often as needed.

`open_corpus` checks the paths (so a bad one fails before any slow work) and remembers
the files; each of `documents()` and `sample()` then reads them again, in the same order.

* `documents()` yields every document (the token cache build reads them once).
* `sample(max_bytes)` yields about ``max_bytes`` of UTF-8 text spread over the whole
  corpus, for training a tokenizer: the corpus (on-disk bytes, in file order) is cut into
  windows, and each window gives its first ``max_bytes / windows`` bytes of documents
  (plus what the windows before it could not fill). A corpus smaller than the budget is
  taken whole. The choice depends only on the files.
* `fingerprint()` is the sha256 of every file's bytes, its reader and the read options:
  the data part of the token-cache key. Hashes are remembered per (path, size, mtime,
  inode) in a small JSON file, so a second run over an unchanged 10 GB corpus rereads none.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write
from ..errors import os_reason
from ..hashing import sha256_file
from .corpus_formats import DEFAULT_TEXT_EXTS
from .data_files import ext_of
from .records import LoadResult, Scan, check_text_exts, read_items, scan, text_readers

SAMPLE_WINDOW = 4 << 20  # at least this many sampled bytes per window
MAX_WINDOWS = 1024


@dataclass
class TextCorpus:
    """Checked input paths and read options; see the module docstring."""

    paths: list
    option: str | None
    text_field: str
    text_exts: tuple[str, ...]
    files: list[Path]
    named: set[Path]
    walk_skips: dict  # what the path check skipped ("duplicate path", ...)
    walk_examples: dict

    def open(self) -> Scan:
        """A fresh reading state (counts skips in ``.result``, position for progress)."""
        readers = text_readers(self.text_exts)
        inputs = ", ".join(str(p) for p in self.paths)
        return Scan(list(self.files), set(self.named), readers, "texts", self.option,
                    self.text_field, LoadResult(items=[], skipped=dict(self.walk_skips),
                                                examples=dict(self.walk_examples)),
                    inputs)  # fmt: skip

    def total_bytes(self) -> int:
        return sum(_stat(f)[0] for f in self.files)

    def documents(self, found: Scan | None = None) -> Iterator[str]:
        """Every document, in order (``found``: a state from `open`, to watch progress)."""
        return read_items(found or self.open())

    def sample(self, max_bytes: int, found: Scan | None = None) -> Iterator[str]:
        """About ``max_bytes`` of documents spread over the corpus (all if it is smaller)."""
        found = found or self.open()
        total = max(1, self.total_bytes())
        windows = max(1, min(MAX_WINDOWS, max_bytes // SAMPLE_WINDOW))
        quota = max_bytes / windows
        taken = 0
        for doc in read_items(found):
            w = min(windows - 1, found.position() * windows // total)
            if taken < (w + 1) * quota:  # a window short of text leaves its share to the next
                taken += len(doc.encode("utf-8"))
                yield doc
                if taken >= max_bytes:
                    return

    def fingerprint(self, memo_dir: str | os.PathLike | None = None, threads: int = 1) -> str:
        """sha256 over the read options and every file's reader and bytes, in order."""
        h = hashlib.sha256(b"tritonlm-corpus/1\n")
        h.update(json.dumps([self.text_field, sorted(self.text_exts)]).encode())
        for file, digest in zip(self.files, self._file_hashes(memo_dir, threads), strict=True):
            lenient = file not in self.named  # binary files are skipped only inside folders
            h.update(f"{ext_of(file)}|{int(lenient)}|{digest}\n".encode())
        return h.hexdigest()

    def _file_hashes(self, memo_dir, threads: int) -> list[str]:
        memo_path = Path(memo_dir) / "file_hashes.json" if memo_dir else None
        memo = _read_memo(memo_path)
        keys = [_memo_key(f) for f in self.files]
        todo = [f for f, k in zip(self.files, keys, strict=True)
                if memo.get(k[0], [None])[:3] != list(k[1:])]  # fmt: skip
        # hashlib drops the GIL on large buffers: threads hash files side by side
        with ThreadPoolExecutor(max(1, threads)) as pool:
            for f, digest in zip(todo, pool.map(_sha256_file, todo), strict=True):
                k = _memo_key(f)
                memo[k[0]] = [*k[1:4], digest]
        out = [memo[k[0]][3] for k in keys]
        if memo_path is not None and todo:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(memo_path, json.dumps(memo, sort_keys=True))
        return out


def open_corpus(
    paths: Iterable,
    option: str | None = None,
    text_field: str = "text",
    text_exts: Sequence[str] = DEFAULT_TEXT_EXTS,
) -> TextCorpus:
    """Check and expand the paths (a `DataError` for a bad one); read nothing yet."""
    paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    found = scan(paths, text_readers(text_exts), "texts", option, text_field)
    exts = check_text_exts(text_exts)
    r = found.result
    return TextCorpus(paths, option, text_field, exts, found.files, found.named, r.skipped,
                      r.examples)  # fmt: skip


def summary(result: LoadResult, n_docs: int) -> str:
    """'2576 documents from 1 file (skipped: ...)' for a streamed read."""
    result.items = range(n_docs)  # summary() counts items; a range costs nothing
    return result.summary("documents")


def _stat(file: Path) -> tuple[int, int, int]:
    try:
        st = file.stat()
    except OSError:
        return 0, 0, 0
    return st.st_size, st.st_mtime_ns, st.st_ino


def _memo_key(file: Path) -> tuple:
    size, mtime, ino = _stat(file)
    return os.path.realpath(file), size, mtime, ino


def _read_memo(path: Path | None) -> dict:
    if path is None:
        return {}
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(memo, dict):
        return {}
    return {k: v for k, v in memo.items() if isinstance(v, list) and len(v) == 4}


def _sha256_file(file: Path) -> str:
    from .data_files import DataError, open_regular

    try:
        return sha256_file(file, opener=open_regular)
    except OSError as e:
        raise DataError(f"{file}: {os_reason(e)}") from None

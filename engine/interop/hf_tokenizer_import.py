"""Reading a Hugging Face byte-level BPE ``tokenizer.json`` into our tokenizer's layout.

Our ids: the 256 bytes, then one token per merge in list order (a token's first merge),
then the special tokens in Hugging Face id order; ``hf_ids`` maps each back. The encoder
rule follows the merges list: one merge per token (GPT-2, SmolLM) is Hugging Face's rule
(``merge_rule="merges"``); every split of every token in token order (our export, Llama-3)
is tiktoken's (``"ranks"``). Whatever else we cannot reproduce exactly is refused with one
line naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tritonlm.engine.tokenizer.bpe_tokenizer import BpeTokenizer
from tritonlm.engine.tokenizer.tokenizer_config import (
    SPECIAL_TOKENS,
    BpeTokenizerConfig,
    TokenizerError,
)

from ..tokenizer.bpe_encoder import merge_bytes
from ..tokenizer.chat_template import match_jinja
from .byte_level import BYTE_CHARS, token_to_str
from .hf_format import TRAINING_KEY, HFFormatError, ImportedTokenizer

__all__ = ["GPT2_DIGITS_PATTERN", "GPT2_PATTERN", "read_hf_tokenizer"]

#: The pre-tokenizer regex of ``ByteLevel(use_regex=True)`` (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
#: GPT-2's regex after ``Digits(individual_digits=True)`` has cut out every digit: each
#: digit is a piece, and a space run before a digit ends there as it ends a text.
GPT2_DIGITS_PATTERN = (
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HFFormatError(f"cannot read {path.name}: {e}") from None


def _obj(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise HFFormatError(f"tokenizer.json: {where}{key} is missing")
    return d[key]


def _normalization(norm: Any) -> str:
    """Our normalization for a ``tokenizers`` normalizer, or refuse."""
    if norm is None:
        return "none"
    kind = norm.get("type") if isinstance(norm, dict) else None
    if kind == "NFC":
        return "nfc"
    if kind == "Sequence":
        items = norm.get("normalizers") or []
        types = [n.get("type") if isinstance(n, dict) else None for n in items]
        if types in ([], ["NFC"]):
            return "nfc" if types else "none"
        if types == ["NFKD", "Replace"]:  # our "ascii": NFKD, then drop non-ASCII
            rep = items[1]
            if rep.get("pattern") == {"Regex": "[^\\x00-\\x7F]"} and rep.get("content") == "":
                return "ascii"
        kind = f"Sequence{types}"
    raise HFFormatError(f"tokenizer.json: normalizer {kind} is not supported (NFC or none)")


def _pattern(pre: Any) -> str:
    """Our one pre-tokenizer regex for a byte-level ``pre_tokenizer``, or refuse."""
    if not isinstance(pre, dict):
        raise HFFormatError("tokenizer.json: pre_tokenizer is missing (not byte-level BPE)")
    items = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items) or not items:
        raise HFFormatError("tokenizer.json: pre_tokenizer.pretokenizers is malformed")
    kinds = [p.get("type") for p in items]
    if "Metaspace" in kinds:
        raise HFFormatError(
            "tokenizer.json: pre_tokenizer Metaspace (sentencepiece style) is not supported; "
            "only byte-level BPE tokenizers are"
        )
    last = items[-1]
    if kinds[-1] != "ByteLevel":
        raise HFFormatError(f"tokenizer.json: pre_tokenizer {kinds} is not byte-level")
    if last.get("add_prefix_space"):
        raise HFFormatError("tokenizer.json: pre_tokenizer ByteLevel.add_prefix_space is true")
    use_regex = last.get("use_regex", True)
    if kinds == ["ByteLevel"] and use_regex:
        return GPT2_PATTERN
    if kinds == ["Digits", "ByteLevel"] and use_regex and items[0].get("individual_digits"):
        return GPT2_DIGITS_PATTERN
    if kinds == ["Split", "ByteLevel"] and not use_regex:
        split = items[0]
        pat = split.get("pattern")
        if split.get("behavior") != "Isolated" or split.get("invert"):
            raise HFFormatError(
                "tokenizer.json: pre_tokenizer Split must be Isolated, not inverted"
            )
        if not isinstance(pat, dict) or not isinstance(pat.get("Regex"), str):
            raise HFFormatError("tokenizer.json: pre_tokenizer Split.pattern must be a Regex")
        return pat["Regex"]
    raise HFFormatError(
        f"tokenizer.json: pre_tokenizer {kinds} (use_regex={use_regex}) has no one-regex "
        "equivalent we support"
    )


def _check_model(model: Any) -> None:
    kind = _obj(model, "type", "model.")
    if kind != "BPE":
        raise HFFormatError(f"tokenizer.json: model.type {kind!r} is not supported (only BPE)")
    if model.get("byte_fallback"):
        raise HFFormatError("tokenizer.json: model.byte_fallback is true (sentencepiece style)")
    for key in ("dropout", "continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise HFFormatError(f"tokenizer.json: model.{key} is {model[key]!r}; we need none")


def _bos_of(post: Any) -> str | None:
    """The special token the post-processor puts before a text, if any; refuse others."""
    if post is None:
        return None
    kind = post.get("type") if isinstance(post, dict) else None
    if kind == "ByteLevel":  # offsets only
        return None
    if kind == "Sequence":
        found = [_bos_of(p) for p in post.get("processors") or []]
        return next((b for b in found if b is not None), None)
    if kind == "TemplateProcessing":
        single = post.get("single") or []
        names = ["$A" if "Sequence" in x else x.get("SpecialToken", {}).get("id") for x in single]
        if names == ["$A"]:
            return None
        if len(names) == 2 and names[1] == "$A" and isinstance(names[0], str):
            return names[0]
        raise HFFormatError(f"tokenizer.json: post_processor template {names} is not supported")
    raise HFFormatError(f"tokenizer.json: post_processor {kind} is not supported")


def _merge_pair(m: Any, r: int) -> tuple[str, str]:
    parts = m.split(" ") if isinstance(m, str) else m
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) for p in parts):
        raise HFFormatError(f"tokenizer.json: model.merges[{r}] is not a pair of tokens: {m!r}")
    return parts[0], parts[1]


def _layout(model: dict, specials: dict[str, int]):
    """Our ids from HF's: bytes, then each merged token in the order the merges list first
    makes it. Returns ``(merges, hf_ids, groups, together)``: ``merges[r]`` is token
    ``256 + r``'s first listed merge made of earlier tokens, ``groups[r]`` every listed
    merge that makes it, ``together`` whether each token's merges follow each other."""
    vocab = _obj(model, "vocab", "model.")
    raw = _obj(model, "merges", "model.")
    if not isinstance(vocab, dict) or not isinstance(raw, list):
        raise HFFormatError("tokenizer.json: model.vocab / model.merges are malformed")
    ours: dict[str, int] = {}  # byte-level string -> our id
    hf_ids: list[int] = []
    for b, ch in enumerate(BYTE_CHARS):
        ours[ch] = b
        hf_ids.append(vocab.get(ch, -1))  # -1: a byte HF drops (SmolLM lacks 0xC0, 0xFF, ...)
    pairs = [_merge_pair(m, r) for r, m in enumerate(raw)]
    made: list[int] = []  # our id made by each merge
    for r, (a, b) in enumerate(pairs):
        if a + b not in ours:
            if a + b not in vocab or a + b in specials:
                raise HFFormatError(
                    f"tokenizer.json: model.merges[{r}] makes {a + b!r}, not a plain vocab token"
                )
            ours[a + b] = len(hf_ids)
            hf_ids.append(vocab[a + b])
        made.append(ours[a + b])
    together = all(t >= u for t, u in zip(made[1:], made, strict=False))  # never goes back
    groups: list[list[tuple[int, int]]] = [[] for _ in range(len(hf_ids) - 256)]
    for r, ((a, b), t) in enumerate(zip(pairs, made, strict=True)):
        if a not in ours or b not in ours:
            raise HFFormatError(
                f"tokenizer.json: model.merges[{r}] ({a!r}, {b!r}) uses a token no merge makes"
            )
        groups[t - 256].append((ours[a], ours[b]))
    merges: list[tuple[int, int]] = []
    for k, group in enumerate(groups):
        own = next((p for p in group if max(p) < 256 + k), None)
        if own is None:
            text = next(s for s, i in ours.items() if i == 256 + k)
            raise HFFormatError(
                f"tokenizer.json: model.merges: no merge makes {text!r} from earlier tokens"
            )
        merges.append(own)
    for s, i in vocab.items():
        if s not in ours and specials.get(s) != i:
            raise HFFormatError(
                f"tokenizer.json: model.vocab token {s!r} (id {i}) is made by no merge"
            )
    return merges, hf_ids, groups, together


def _merge_rule(config: BpeTokenizerConfig, merges, groups, together: bool) -> str:
    """``"ranks"`` when the merges list every split of each token, in token order (our own
    export, Llama-3); ``"merges"`` when each token has one merge (GPT-2, SmolLM)."""
    tok = BpeTokenizer(config.replace(merge_rule="ranks"), merges)
    splits: list[set] = [set() for _ in merges]
    for pair, t in tok.pair_ranks().items():
        splits[t - 256].add(pair)
    if together and all(set(g) == s for g, s in zip(groups, splits, strict=True)):
        return "ranks"
    several = next((r for r, g in enumerate(groups) if len(g) > 1), None)
    if several is None:
        return "merges"
    text = token_to_str(tok.token_bytes(256 + several))
    raise HFFormatError(
        f"tokenizer.json: model.merges lists {len(groups[several])} merges for {text!r} "
        "but not every split of each token in token order; that merge order is not supported"
    )


def _training_fields(hf_cfg: dict, n_vocab: int) -> dict[str, int]:
    """Our export's training-only config fields (the vocab_size training aimed for, which
    may exceed the one it reached, and min_frequency); others' files have none."""
    kept = hf_cfg.get(TRAINING_KEY)
    if not isinstance(kept, dict):
        return {}
    out = {k: v for k, v in kept.items() if k in ("vocab_size", "min_frequency")}
    if not all(type(v) is int and v >= 1 for v in out.values()):
        return {}
    if out.get("vocab_size", n_vocab) < n_vocab:
        del out["vocab_size"]
    return out


def _token_text(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v if isinstance(v, str) else None


def read_hf_tokenizer(folder: Path) -> ImportedTokenizer:
    """:func:`.hf_tokenizer.import_hf_tokenizer`'s work."""
    data = _read_json(folder / "tokenizer.json")
    if not isinstance(data, dict):
        raise HFFormatError("tokenizer.json: not a JSON object")
    cfg_path = folder / "tokenizer_config.json"
    hf_cfg = _read_json(cfg_path) if cfg_path.exists() else {}
    if not isinstance(hf_cfg, dict):
        raise HFFormatError("tokenizer_config.json: not a JSON object")
    model = _obj(data, "model", "")
    _check_model(model)
    normalization = _normalization(data.get("normalizer"))
    pattern = _pattern(data.get("pre_tokenizer"))
    decoder = data.get("decoder")
    if not isinstance(decoder, dict) or decoder.get("type") != "ByteLevel":
        kind = decoder.get("type") if isinstance(decoder, dict) else decoder
        raise HFFormatError(f"tokenizer.json: decoder {kind} is not ByteLevel")
    added = data.get("added_tokens") or []
    specials: dict[str, int] = {}
    for i, a in enumerate(added):
        text = _obj(a, "content", f"added_tokens[{i}].")
        if not a.get("special"):
            raise HFFormatError(
                f"tokenizer.json: added_tokens[{i}] {text!r} is not special (a plain added "
                "token splits text where our encoder does not)"
            )
        if a.get("lstrip") or a.get("rstrip") or a.get("single_word"):
            raise HFFormatError(f"tokenizer.json: added_tokens[{i}] {text!r} strips spaces")
        tid = _obj(a, "id", f"added_tokens[{i}].")
        if type(tid) is not int or not isinstance(text, str) or not text:
            raise HFFormatError(f"tokenizer.json: added_tokens[{i}] is malformed")
        specials[text] = tid
    bos = _bos_of(data.get("post_processor"))
    merges, hf_ids, groups, together = _layout(model, specials)
    names = sorted(specials, key=specials.get)
    hf_ids += [specials[s] for s in names]
    known = [i for i in hf_ids if i != -1]
    if len(set(known)) != len(known) or not all(type(i) is int and i >= 0 for i in known):
        raise HFFormatError("tokenizer.json: model.vocab and added_tokens ids overlap or are bad")
    notes: list[str] = []
    absent = [f"{b:#04x}" for b in range(256) if hf_ids[b] == -1]
    if absent:
        notes.append(
            f"{len(absent)} bytes have no token in the vocabulary ({', '.join(absent)}): "
            "Hugging Face drops them from text, here they encode to their byte ids, whose "
            "rows (hf_ids -1) start fresh"
        )
    role_of = {
        "eos": _token_text(hf_cfg.get("eos_token")),
        "pad": _token_text(hf_cfg.get("pad_token")),
    }
    if bos is not None:
        role_of["bos"] = bos
    if "<|im_start|>" in specials and "<|im_end|>" in specials:
        role_of.update(start="<|im_start|>", end="<|im_end|>")
    base: dict[str, Any] = {
        "vocab_size": 256 + len(merges) + len(names),
        "normalization": normalization,
        "pattern": pattern,
        "chat_template": "none",
    }
    base.update(_training_fields(hf_cfg, base["vocab_size"]))
    if tuple(names[: len(SPECIAL_TOKENS)]) == SPECIAL_TOKENS:  # one of ours
        base["special_tokens"] = names[len(SPECIAL_TOKENS) :]
    else:
        roles = [[r, t] for r, t in role_of.items() if t in specials]
        base.update(builtin_specials=False, special_tokens=names, roles=roles)
    try:
        config = BpeTokenizerConfig.from_dict(base)
        config = config.replace(merge_rule=_merge_rule(config, merges, groups, together))
    except TokenizerError as e:
        raise HFFormatError(f"tokenizer.json: {e}") from None
    config = _chat_template(folder, hf_cfg, config, notes)
    tok = BpeTokenizer(config, merges)
    if not model.get("ignore_merges"):
        _check_whole_tokens(tok, notes)
    return ImportedTokenizer(tok, hf_ids, notes)


def _chat_template(folder: Path, hf_cfg: dict, config, notes: list[str]):
    """``config`` with the chat template of the folder when it is one we render."""
    source = hf_cfg.get("chat_template")
    jinja_file = folder / "chat_template.jinja"  # where transformers 5 saves it
    if source is None and jinja_file.exists():
        try:
            source = jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise HFFormatError(f"cannot read chat_template.jinja: {e}") from None
    if isinstance(source, list):  # named templates: the default one
        named = [t for t in source if isinstance(t, dict) and t.get("name") == "default"]
        source = named[0].get("template") if named else None
    if source is None:
        notes.append("no chat template: raw mode only")
        return config
    variables = {
        f"{k}_token": _token_text(hf_cfg.get(f"{k}_token")) for k in ("bos", "eos", "pad", "unk")
    }
    found = match_jinja(source, config, variables)
    if isinstance(found, str):
        name = " ".join(str(source).split())[:60]
        notes.append(f"{found}: {name!r}...; raw mode only")
        return config
    kind, system_prompt = found
    return config.replace(chat_template=kind, system_prompt=system_prompt)


def _check_whole_tokens(tok: BpeTokenizer, notes: list[str]) -> None:
    """With ``ignore_merges`` false, Hugging Face never makes a token its merges cannot
    reach, while our encoder turns a pre-token that is a whole token into it: say where."""
    pair_rank = tok.pair_ranks()
    odd = [
        t
        for t in range(256, 256 + len(tok.merges))
        if merge_bytes(tok.token_bytes(t), pair_rank) != [t]
    ]
    if odd:
        example = token_to_str(tok.token_bytes(odd[0]))
        notes.append(
            f"{len(odd)} tokens (e.g. {example!r}) are not reached by their merges; a "
            "pre-token equal to one of them encodes to it here but not in Hugging Face"
        )

"""The chat templates we render exactly, as token segments and as Jinja for Hugging Face.

Two templates (``BpeTokenizerConfig.chat_template``):

* ``"tritonlm"`` (ours): ``<|bos|>`` then per message ``<|role|>content<|end|>``; the
  generation prompt is ``<|assistant|>``.
* ``"chatml"`` (SmolLM, Qwen): per message ``<|im_start|>role\\ncontent<|im_end|>\\n``;
  the generation prompt is ``<|im_start|>assistant\\n``. With ``system_prompt`` set, a
  conversation that does not open with a system message gets that one first.

``chat_segments`` gives the rendering as ``(text, is_special, mask)`` pieces (the tokenizer
encodes runs of plain pieces as one text, as a Jinja template's output is tokenized);
``jinja_template`` writes the same template for ``transformers``; ``match_jinja`` tells
which of ours a foreign Jinja template is, by rendering both on probe conversations.
"""

from __future__ import annotations

from typing import Any

__all__ = ["chat_segments", "chat_tail", "jinja_template", "match_jinja", "render_ids"]

Segment = tuple[str, bool, int]  # (text, is a special token, mask: 1 = assistant output)


def chat_segments(config, messages, add_generation_prompt: bool) -> list[Segment]:
    """The rendering of checked ``messages`` under ``config``'s template and roles."""
    roles = config.role_tokens
    out: list[Segment] = []
    if config.chat_template == "tritonlm":
        out.append((roles["bos"], True, 0))
        for m in messages:
            flag = int(m["role"] == "assistant")
            out += [(roles[m["role"]], True, 0), (m["content"], False, flag)]
            out.append((roles["end"], True, flag))
        if add_generation_prompt:
            out.append((roles["assistant"], True, 0))
        return out
    start, end = roles["start"], roles["end"]
    if config.system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": config.system_prompt}, *messages]
    for m in messages:
        flag = int(m["role"] == "assistant")
        out += [(start, True, 0), (m["role"] + "\n", False, 0), (m["content"], False, flag)]
        out += [(end, True, flag), ("\n", False, 0)]
    if add_generation_prompt:
        out += [(start, True, 0), ("assistant\n", False, 0)]
    return out


def chat_tail(config) -> list[Segment]:
    """The segments after the last message's content, through the generation prompt."""
    roles = config.role_tokens
    if config.chat_template == "tritonlm":
        return [(roles["end"], True, 0), (roles["assistant"], True, 0)]
    return [(roles["end"], True, 0), ("\n", False, 0), (roles["start"], True, 0)] + [
        ("assistant\n", False, 0)
    ]


def render_ids(tok, segments: list[Segment]) -> tuple[list[int], list[int]]:
    """``(ids, mask)`` of segments: a special token is its id; plain texts that no special
    token separates are encoded as one text (as a Jinja template's output is tokenized),
    and a token's mask is that of the piece its last byte comes from."""
    ids: list[int] = []
    mask: list[int] = []
    plain: list[tuple[str, int]] = []
    specials = tok.special_tokens
    for text, is_special, flag in [*segments, ("", True, 0)]:  # a last "" flushes plain
        if not is_special:
            plain.append((text, flag))
            continue
        if len(plain) == 1:  # our template: content alone between two special tokens
            body = tok.encode(plain[0][0])
            ids += body
            mask += [plain[0][1]] * len(body)
        elif plain:
            body = tok.encode("".join(t for t, _ in plain))
            flags = [f for t, f in plain for _ in tok.normalize(t).encode("utf-8")]
            end = 0
            for t in body:
                end += len(tok.token_bytes(t))
                ids.append(t)
                mask.append(flags[end - 1] if end <= len(flags) else plain[-1][1])
        plain = []
        if text:
            ids.append(specials[text])
            mask.append(flag)
    return ids, mask


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja undoes these backslash escapes)."""
    esc = text.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + esc.replace("\n", "\\n").replace("\r", "\\r") + "'"


_CHECK_ROLE = (
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('role must be system, user or assistant') -}}{%- endif -%}"
)


def jinja_template(tok) -> str | None:
    """A Jinja ``chat_template`` rendering exactly ``tok``'s template (None: raw only)."""
    cfg = tok.config
    roles = cfg.role_tokens
    if cfg.chat_template == "tritonlm":
        per_role = " + ".join(
            f"({_lit(roles[r])} if message['role'] == {_lit(r)} else '')"
            for r in ("system", "user", "assistant")
        )
        return (
            "{{- " + _lit(roles["bos"]) + " -}}"
            "{%- for message in messages -%}" + _CHECK_ROLE + "{{- " + per_role
            + " + message['content'] + " + _lit(roles["end"]) + " -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + _lit(roles["assistant"]) + " -}}"
            "{%- endif -%}"
        )  # fmt: skip
    if cfg.chat_template == "chatml":
        start, end = _lit(roles["start"]), _lit(roles["end"])
        head = ""
        if cfg.system_prompt:
            head = (
                "{%- if messages and messages[0]['role'] != 'system' -%}{{- " + start
                + " + 'system\\n' + " + _lit(cfg.system_prompt) + " + " + end
                + " + '\\n' -}}{%- endif -%}"
            )  # fmt: skip
        return (
            head + "{%- for message in messages -%}" + _CHECK_ROLE + "{{- " + start
            + " + message['role'] + '\\n' + message['content'] + " + end + " + '\\n' -}}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + start + " + 'assistant\\n' -}}{%- endif -%}"
        )  # fmt: skip
    return None


# --------------------------------------------------------------------------------------
# Recognizing a foreign template (import)
# --------------------------------------------------------------------------------------

_PROBES: list[tuple[list[dict[str, str]], bool]] = [
    ([{"role": "user", "content": "Hello there!"}], True),
    ([{"role": "user", "content": "Hi"}], False),
    (
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": " Two  spaces\nand a line "},
            {"role": "assistant", "content": "Sure: 2+2=4."},
            {"role": "user", "content": "Thanks!"},
        ],
        True,
    ),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], False),
]


def _render_jinja(source: str, messages, add_generation_prompt: bool, specials: dict) -> str:
    """Render as ``transformers`` does (sandboxed, trim_blocks, lstrip_blocks)."""
    import jinja2  # torch's own dependency; imported only when importing a model
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.exceptions.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **specials
    )


def _our_text(config, messages, add_generation_prompt: bool) -> str:
    return "".join(t for t, _, _ in chat_segments(config, messages, add_generation_prompt))


def match_jinja(source: Any, config, specials: dict[str, Any]) -> tuple[str, str] | str:
    """``(template, system_prompt)`` of ours that ``source`` renders identically on every
    probe under ``config``'s roles; otherwise a sentence saying why not. ``specials`` are
    the variables a template sees (``bos_token``, ...)."""
    if not isinstance(source, str):
        return "chat_template is not a string"
    roles = config.role_tokens
    kinds = []
    if all(r in roles for r in ("bos", "user", "assistant", "system", "end")):
        kinds.append("tritonlm")
    if "start" in roles and "end" in roles:
        kinds.append("chatml")
    try:
        rendered = [_render_jinja(source, m, g, specials) for m, g in _PROBES]
    except Exception as e:  # any template error: we only report that it is not ours
        return f"chat template could not be rendered ({type(e).__name__}: {e})"
    for kind in kinds:
        system_prompt = ""
        if kind == "chatml":  # a default system message shows when none is given
            head = roles["start"] + "system\n"
            first = rendered[0]
            if first.startswith(head) and roles["end"] in first:
                system_prompt = first[len(head) : first.index(roles["end"])]
        cand = config.replace(chat_template=kind, system_prompt=system_prompt)
        if all(r == _our_text(cand, m, g) for r, (m, g) in zip(rendered, _PROBES, strict=True)):
            return kind, system_prompt
    return "chat template is neither ours nor ChatML as we render it"

"""Command templates: `{name}` and `{stage.value}` placeholders, `{{`/`}}` for literal braces.

Commands are split into arguments before any value is substituted, and each argument is rendered on its own, so a
grid value or captured text containing quotes, `;`, `$()`, spaces or newlines stays one literal argument: nothing
a value holds can ever be read as shell syntax or split into two arguments.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Collection, Mapping
from functools import lru_cache

RUNTIME_PLACEHOLDERS: frozenset[str] = frozenset({"gpu", "host", "slot", "attempt", "task_id", "run_dir", "python"})
"""Filled only when a task is dispatched to a slot, so they never enter a task's content hash."""

PLAN_BUILTINS: frozenset[str] = frozenset({"recipe_dir"})
"""Known when the plan is made, before anything runs."""

PLACEHOLDER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*")
"""A placeholder: a name, or a dotted `stage.value` naming a value captured by an earlier stage."""

_FORM = "{name} or {stage.value} (letters, digits, '_' and '-')"


class TemplateError(ValueError):
    """A template that does not parse; the message says where and how to write it."""


class UnknownPlaceholder(TemplateError):
    """A placeholder with no value to fill it; `.name` is the placeholder as written."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"unknown placeholder {{{name}}}")


class _Field:
    """One placeholder occurrence in a parsed template."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


@lru_cache(maxsize=4096)
def _parse(text: str) -> tuple[str | _Field, ...]:
    """The template as literal text pieces (braces unescaped) and placeholders, validated once and cached."""
    parts: list[str | _Field] = []
    literal: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "{":
            if text.startswith("{{", i):
                literal.append("{")
                i += 2
                continue
            m = PLACEHOLDER_NAME.match(text, i + 1)
            if m is not None and m.end() < n and text[m.end()] == "}":
                if literal:
                    parts.append("".join(literal))
                    literal = []
                parts.append(_Field(m.group()))
                i = m.end() + 1
                continue
            close = text.find("}", i + 1)
            reopen = text.find("{", i + 1)
            if close != -1 and (reopen == -1 or close < reopen):
                raise TemplateError(
                    f"{text[i : close + 1]!r} at column {i + 1} is not a placeholder; expected {_FORM}, "
                    "or '{{' and '}}' for literal braces"
                )
            raise TemplateError(f"unbalanced '{{' at column {i + 1}; write '{{{{' for a literal brace")
        if c == "}":
            if text.startswith("}}", i):
                literal.append("}")
                i += 2
                continue
            raise TemplateError(f"unbalanced '}}' at column {i + 1}; write '}}}}' for a literal brace")
        literal.append(c)
        i += 1
    if literal:
        parts.append("".join(literal))
    return tuple(parts)


def placeholders(text: str) -> list[str]:
    """The placeholder names in `text`, each once, in order of first appearance; raises TemplateError."""
    seen: dict[str, None] = {}
    for part in _parse(text):
        if isinstance(part, _Field):
            seen.setdefault(part.name, None)
    return list(seen)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def _lookup(name: str, values: Mapping[str, object]) -> object:
    """A flat value (`values["dht.peers"]`) or a nested one (`values["dht"]["peers"]`)."""
    if name in values:
        return values[name]
    head, *rest = name.split(".")
    current: object = values.get(head, _MISSING)
    for part in rest:
        if not isinstance(current, Mapping) or part not in current:
            return _MISSING
        current = current[part]
    return current


_MISSING = object()


def render(
    text: str,
    values: Mapping[str, object],
    *,
    keep: Collection[str] = frozenset(),
    final: bool = True,
) -> str:
    """Fill each placeholder with `str(value)`; names in `keep` (or under a kept first part) stay as written.

    With `final=False` the result is still a template: literal braces, including those inside substituted
    values, stay escaped, so a later `render` of the remaining placeholders gives the same text as one call.
    """
    out: list[str] = []
    for part in _parse(text):
        if isinstance(part, str):
            out.append(part if final else _escape(part))
            continue
        name = part.name
        if name in keep or name.split(".", 1)[0] in keep:
            out.append(f"{{{name}}}")
            continue
        value = _lookup(name, values)
        if value is _MISSING:
            raise UnknownPlaceholder(name)
        out.append(str(value) if final else _escape(str(value)))
    return "".join(out)


def split_command(command: str | list[str]) -> list[str]:
    """The argument templates of a command: a string is split like a POSIX shell would, a list is kept."""
    if isinstance(command, list):
        return list(command)
    try:
        return shlex.split(command)
    except ValueError as exc:
        raise TemplateError(f"the command does not split into arguments ({exc}); expected balanced quotes") from None


def render_argv(
    command: str | list[str],
    values: Mapping[str, object],
    *,
    keep: Collection[str] = frozenset(),
    final: bool = True,
) -> list[str]:
    """Split the command first, then render each argument, so a value is always exactly one literal argument."""
    return [render(arg, values, keep=keep, final=final) for arg in split_command(command)]

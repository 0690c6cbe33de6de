"""A griffe extension for the API reference: curvcore's docstrings in Markdown terms.

The docstrings are Google style with two reStructuredText habits that
mkdocstrings would print literally: Sphinx roles (``:func:`name```) and doctest
lines (``>>> ...``) outside an ``Examples:`` section. This extension, loaded by
``mkdocs.yml``, rewrites a role to plain code (``name``) and wraps each run of
doctest lines in a ``pycon`` code block. It changes only what the site shows,
never the source.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|obj|exc)[:]`~?([^`]+)`")
_PROMPT = re.compile(r"^(\s*)(>>>|\.\.\.)( |$)")


def markdown_docstring(text: str) -> str:
    """``text`` with Sphinx roles as code spans and doctest runs as fenced ``pycon`` blocks."""
    text = _ROLE.sub(r"`\1`", text)
    out: list[str] = []
    in_block, indent = False, ""
    for line in text.splitlines():
        match = _PROMPT.match(line)
        if match and not in_block:
            out.append(f"{match.group(1)}```pycon")
            in_block = True
        elif not match and in_block:
            out.append(f"{indent}```")
            in_block = False
        if match:
            indent = match.group(1)
        out.append(line)
    if in_block:
        out.append(f"{indent}```")
    return "\n".join(out)


class MarkdownDocstrings(griffe.Extension):
    """Rewrite every docstring when its object (module, class, function, attribute) is created."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

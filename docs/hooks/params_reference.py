"""MkDocs hook: the configuration reference, generated from ``components/core/config.py`` at build time.

A page containing ``<!-- params-reference -->`` gets one table per ``params.yaml`` section: every
key with its type, default, bounds and meaning. Types and meanings come from the source (the
annotation text and the attribute docstring under each field; a field without one falls back to its
comment in ``params.yaml``), defaults and bounds from the pydantic model itself, so the page cannot
drift from the code that validates the file.
"""

from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

PLACEHOLDER = "<!-- params-reference -->"
LONG_DEFAULT = 90
"""Defaults longer than this (characters of YAML) are shown in a block under the table."""
_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the placeholder with the generated reference (other pages pass through)."""
    if PLACEHOLDER not in markdown:
        return markdown
    from components.core.config import Params

    comments = _yaml_comments(Path(config["config_file_path"]).parent / "params.yaml")
    return markdown.replace(PLACEHOLDER, render_reference(Params, comments))


def render_reference(params_cls: type[BaseModel], comments: dict[str, str]) -> str:
    """Markdown for every section of ``Params``, in file order."""
    parts = []
    for name, field in params_cls.model_fields.items():
        key = field.alias or name
        parts.append(_section(key, field.annotation, comments, level=2))  # type: ignore[arg-type]
    return "\n\n".join(parts)


def _section(key: str, cls: type[BaseModel], comments: dict[str, str], *, level: int) -> str:
    source = _FieldSource(cls)
    lines = [f"{'#' * level} `{key}`", ""]
    if cls.__doc__:  # a class's docstring is not inherited: None unless the section has its own
        lines += [_rst_to_md(inspect.cleandoc(cls.__doc__)), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    nested, long_defaults = [], []
    for name, field in cls.model_fields.items():
        yaml_key = field.alias or name
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            nested.append((f"{key}.{yaml_key}", field.annotation))
            lines.append(
                f"| `{yaml_key}` | section | see [`{key}.{yaml_key}`](#{_anchor(key, yaml_key)}) | "
                f"{source.doc(name) or comments.get(f'{key}.{yaml_key}', '')} |"
            )
            continue
        default = _yaml(field.get_default(call_default_factory=True))
        if len(default) > LONG_DEFAULT:
            long_defaults.append((yaml_key, field.get_default(call_default_factory=True)))
            default = "below"
        else:
            default = f"`{default}`"
        meaning = source.doc(name) or comments.get(f"{key}.{yaml_key}", "")
        bounds = _bounds(field.metadata)
        lines.append(
            f"| `{yaml_key}` | {source.type(name)} | {default} | "
            f"{meaning}{' (' + bounds + ')' if bounds else ''} |"
        )
    for yaml_key, value in long_defaults:
        block = yaml.safe_dump({yaml_key: _plain(value)}, sort_keys=False, default_flow_style=False)
        lines += ["", f"Default of `{key}.{yaml_key}`:", "", "```yaml", block.rstrip(), "```"]
    out = "\n".join(lines)
    for sub_key, sub_cls in nested:
        out += "\n\n" + _section(sub_key, sub_cls, comments, level=level + 1)
    return out


class _FieldSource:
    """The annotation text and attribute docstring of each field, read from the class's source."""

    def __init__(self, cls: type) -> None:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        self._types: dict[str, str] = {}
        self._docs: dict[str, str] = {}
        for stmt, after in zip(body, [*body[1:], None], strict=True):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                self._types[name] = ast.unparse(stmt.annotation)
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    self._docs[name] = _rst_to_md(inspect.cleandoc(str(after.value.value)))

    def type(self, name: str) -> str:
        text = self._types.get(name, "")
        literal = re.fullmatch(r"Literal\[(.*)\]", text)
        if literal:
            choices = [c.strip().strip("'\"") for c in literal.group(1).split(",")]
            return " · ".join(f"`{c}`" for c in choices)
        text = re.sub(
            r"Literal\[(.*?)\]", lambda m: re.sub(r"['\"]", "", m.group(1)).replace(", ", "/"), text
        )
        return " or ".join(f"`{part.strip()}`" for part in text.replace("None", "null").split("|"))

    def doc(self, name: str) -> str:
        return self._docs.get(name, "")


def _rst_to_md(text: str) -> str:
    """Docstring markup -> Markdown on one line: ``x`` -> `x`, :data:`X` -> `X`."""
    text = re.sub(r":\w+:`([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return " ".join(text.split()).replace("|", "\\|")


def _bounds(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        for attr, symbol in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                found.append(f"{symbol} {value}")
    return ", ".join(found)


def _plain(value: Any) -> Any:
    """Defaults as YAML would spell them: paths as text, tuples as lists, sections as mappings."""
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(by_alias=True))
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _yaml(value: Any) -> str:
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip().replace("|", "\\|")


def _anchor(section: str, key: str) -> str:
    """The id MkDocs' toc gives a heading like ``evaluate.robustness`` (dots dropped)."""
    return re.sub(r"[^a-z0-9_-]", "", f"{section}{key}".lower())


def _yaml_comments(path: Path) -> dict[str, str]:
    """``section.key`` -> its trailing comment in params.yaml (the fallback meaning)."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z_][\w]*):(.*?)(?:\s+#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, _value, comment = len(match.group(1)), match.group(2), match.group(3), match.group(4)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        dotted = ".".join([k for _, k in stack] + [key])
        if comment:
            out[dotted] = comment.strip().removeprefix("...").strip().replace("|", "\\|")
        stack.append((indent, key))
    return out

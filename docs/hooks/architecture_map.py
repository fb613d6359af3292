"""MkDocs hook: the layer diagram and the module map, generated from the code at build time.

A page containing ``<!-- layer-diagram -->`` gets a Mermaid diagram of the layers contract in
``pyproject.toml`` (``[tool.importlinter]``, the one ``make lint`` checks); ``<!-- module-map -->``
gets, for every package of ``components/`` (in layer order) and for ``tasks/`` and ``flows/``, each
module with the first sentence of its docstring. Both are read from the files (``tomllib``, ``ast``;
nothing is imported), so the page shows the tree as it is when the site is built.
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path
from typing import Any

LAYERS = "<!-- layer-diagram -->"
MODULES = "<!-- module-map -->"
TASK = "<!-- task-members -->"
RECORDS = "<!-- stage-records -->"
TASK_MODULE = "components/task/base.py"
RECORDS_MODULE = "components/pipeline/records.py"
ORCHESTRATION = ("flows", "tasks")
"""The orchestration packages above ``components``, top first."""


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    """Replace the placeholders (other pages pass through)."""
    if not any(mark in markdown for mark in (LAYERS, MODULES, TASK, RECORDS)):
        return markdown
    root = Path(config["config_file_path"]).parent
    layers = layer_contract(root / "pyproject.toml")
    markdown = markdown.replace(LAYERS, layer_diagram(layers))
    markdown = markdown.replace(MODULES, module_map(root, layers))
    markdown = markdown.replace(TASK, class_members(root / TASK_MODULE, "Task"))
    return markdown.replace(RECORDS, module_classes(root / RECORDS_MODULE))


def layer_contract(pyproject: Path) -> list[list[str]]:
    """The ``layers`` contract's layers, top first, each a list of packages (``a | b`` side by side)."""
    contracts = tomllib.loads(pyproject.read_text())["tool"]["importlinter"]["contracts"]
    layered = next(c for c in contracts if c.get("type") == "layers")
    return [[p.strip() for p in layer.split("|")] for layer in layered["layers"]]


def layer_diagram(layers: list[list[str]]) -> str:
    """Mermaid: flows -> tasks -> each layer of components, top to bottom; an arrow means "may import"."""
    rows = [[p] for p in ORCHESTRATION] + layers
    lines = ["```mermaid", "flowchart TB"]
    for i, row in enumerate(rows):
        names = " · ".join(p.removeprefix("components.") for p in row)
        lines.append(f'    L{i}["{names}"]')
    lines += [f"    L{i} --> L{i + 1}" for i in range(len(rows) - 1)]
    lines.append("```")
    return "\n".join(lines)


def module_map(root: Path, layers: list[list[str]]) -> str:
    """One table per package: module -> the first sentence of its docstring."""
    packages = list(ORCHESTRATION) + [p for layer in layers for p in layer]
    parts = []
    for package in packages:
        folder = root / package.replace(".", "/")
        modules = sorted(m for m in folder.glob("*.py") if m.name != "__init__.py")
        if not modules:
            continue
        parts += [f"**`{package}`**", "", "| module | what it holds |", "|---|---|"]
        parts += [f"| `{m.stem}` | {first_sentence(m)} |" for m in modules]
        parts.append("")
    return "\n".join(parts)


def first_sentence(path: Path) -> str:
    """The first sentence of a module's docstring, as Markdown on one line."""
    return _sentence(ast.get_docstring(ast.parse(path.read_text())) or "")


def _sentence(doc: str) -> str:
    """The first sentence of a docstring (its first paragraph up to the first full stop), as Markdown."""
    paragraph = " ".join(doc.split("\n\n")[0].split())
    match = re.match(r"(.+?(?<!e\.g)(?<!i\.e)(?<!vs)\.)(\s|$)", paragraph)
    sentence = (match.group(1) if match else paragraph).removesuffix(".")
    sentence = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", sentence).replace("``", "`")
    return sentence.replace("|", "\\|")


def class_members(path: Path, name: str) -> str:
    """A table of a class's public attributes and methods, each with its docstring's first sentence."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    rows = ["| member | what it gives |", "|---|---|"]
    for stmt, after in zip(cls.body, [*cls.body[1:], None], strict=True):
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            doc = (
                after.value.value
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                else ""
            )
            rows.append(f"| `{stmt.target.id}` | {_sentence(str(doc))} |")
        elif isinstance(stmt, ast.FunctionDef) and not stmt.name.startswith("_"):
            args = [a.arg for a in stmt.args.args[1:]] + [f"{a.arg}=" for a in stmt.args.kwonlyargs]
            rows.append(f"| `{stmt.name}({', '.join(args)})` | {_sentence(ast.get_docstring(stmt) or '')} |")
    return "\n".join(rows)


def module_classes(path: Path) -> str:
    """A table of the classes a module defines, each with its docstring's first sentence."""
    if not path.exists():
        return f"*(`{path.name}` is not in the tree)*"
    tree = ast.parse(path.read_text())
    rows = ["| record | what it carries |", "|---|---|"]
    rows += [
        f"| `{n.name}` | {_sentence(ast.get_docstring(n) or '')} |"
        for n in tree.body
        if isinstance(n, ast.ClassDef) and not n.name.startswith("_")
    ]
    return "\n".join(rows)

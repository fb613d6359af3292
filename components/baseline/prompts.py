"""Zero-shot prompts: class names -> prompts from a template ensemble (open_clip's 80 OpenAI
ImageNet templates, its 7-template subset, or a user file), with per-class display names and
prompt overrides (``baseline.templates``, ``baseline.class_names``, ``baseline.class_prompts``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from components.baseline.clip_model import TEMPLATE_SETS, builtin_templates
from components.core.errors import ConfigError


def resolve_templates(spec: str) -> tuple[str, ...]:
    """Prompt templates with ``{}`` for the class name.

    spec: ``imagenet80`` (open_clip's 80 OpenAI ImageNet templates), ``short`` (its 7-template
    subset), or a text file, one template per line (blank lines and ``#`` comments skipped).
    """
    if spec in TEMPLATE_SETS:
        return builtin_templates(spec)
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"baseline.templates {spec!r} is neither {' nor '.join(TEMPLATE_SETS)} nor an existing file"
        )
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    templates = tuple(ln for ln in lines if ln and not ln.startswith("#"))
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise ConfigError(
            f"template file {path}: every line needs {{}} where the class name goes"
            + (f" (e.g. 'a photo of a {{}}.'); bad line: {bad[0]!r}" if bad else "; the file has none")
        )
    return templates


def class_prompts(
    classes: Sequence[str],
    templates: Sequence[str],
    *,
    names: Mapping[str, str] | None = None,
    overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[list[str]]:
    """The prompts of each class, in class order.

    Each template's ``{}`` is filled with the class's display name (``names[c]``, else the class
    with ``_`` as spaces). ``overrides[c]`` replaces the templates for class c (its prompts may use
    ``{}`` too). A key that is not a class is an error: a typo must not silently do nothing.
    """
    names, overrides = dict(names or {}), dict(overrides or {})
    for what, mapping in (("class_names", names), ("class_prompts", overrides)):
        unknown = sorted(set(mapping) - set(classes))
        if unknown:
            raise ConfigError(f"baseline.{what} names classes not in the dataset: {unknown}")
    empty = sorted(c for c, ps in overrides.items() if not ps)
    if empty:
        raise ConfigError(f"baseline.class_prompts gives no prompts for {empty}")
    out = []
    for c in classes:
        display = names.get(c, c.replace("_", " "))
        out.append([t.replace("{}", display) for t in overrides.get(c, templates)])
    return out

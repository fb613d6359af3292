"""What the MLflow UI says about a registered model and each of its versions, in Markdown.

The registry page is the first place people look for "what is this model and may we ship it":
the model description says what the model does (task, classes), how its aliases work and where the
promotion log is; each version's description says what it was trained on, its gate verdict with
the failed gates, and links to its gate report and training run.

Links are relative to the UI's own address (``#/runs/...``), so they work wherever the UI of this
tracking store is served (``mlflow server``, ``mlflow ui``, ``make ui``).
"""

from __future__ import annotations

from dataclasses import dataclass

GATE_REPORT = "evaluate/report.html"
"""Where evaluate logs the gate report in the training run."""
_MAX_CLASSES = 40


@dataclass(frozen=True)
class ModelCard:
    """The facts about one registered version that its description and the model's show.

    ``task``: the task's title ("single-label"); ``headline``: its test metric as text
    ("accuracy 0.9312"); ``gate_verdict``: the gate report's one-sentence verdict;
    ``failed_gates``: what each blocking failed gate measured ("recall of 'Shirt' 0.58 < 0.60").
    """

    task: str
    classes: tuple[str, ...]
    data_version: str
    git_commit: str
    headline: str
    gates_passed: bool
    gate_verdict: str
    failed_gates: tuple[str, ...] = ()
    gate_report: str = GATE_REPORT


def _classes(classes: tuple[str, ...]) -> str:
    shown = ", ".join(classes[:_MAX_CLASSES])
    return shown + (f", … ({len(classes) - _MAX_CLASSES} more)" if len(classes) > _MAX_CLASSES else "")


def _verdict(card: ModelCard) -> str:
    # Plain text, no Markdown: the versions table on the model page shows this line's start raw.
    word = "PASSED" if card.gates_passed else "FAILED"
    return f"Gates: {word} — {card.gate_verdict.split(': ', 1)[-1]}"


def version_description(name: str, version: str, card: ModelCard, *, run_id: str, experiment_id: str) -> str:
    """Markdown for one version: gate verdict (and the failed gates), then its facts and links."""
    failed = "".join(f"\n- {m}" for m in card.failed_gates)
    run = f"#/experiments/{experiment_id}/runs/{run_id}"
    rows = [
        ("Task", f"{card.task}, {len(card.classes)} classes"),
        ("Test metric", card.headline or "—"),
        ("Data version", f"`{card.data_version}`"),
        ("Code", f"git `{card.git_commit[:12]}`"),
        ("Gate report", f"[{card.gate_report}]({run}/artifacts/{card.gate_report})"),
        ("Training run", f"[{run_id}]({run})"),
        ("Load", f'`mlflow.pyfunc.load_model("models:/{name}/{version}")`'),
    ]
    table = "\n".join(["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    return f"{_verdict(card)}{failed}\n\n{table}\n\n**Classes:** {_classes(card.classes)}\n"


def model_description(name: str, latest: str, card: ModelCard, *, promotions_experiment_id: str) -> str:
    """Markdown for the registered model: what it is, how promotion works, where the log is."""
    verdict = "gates passed" if card.gates_passed else "gates FAILED"
    return (
        f"Image classifier trained, evaluated and registered by imgflow: **{card.task}**, "
        f"{len(card.classes)} classes.\n\n"
        f"**Classes:** {_classes(card.classes)}\n\n"
        "**Aliases** (MLflow's replacement for stages):\n"
        "- `candidate`: the newest registered version;\n"
        "- `challenger`: the newest version whose quality gates passed;\n"
        f"- `champion`: the promoted version, what `imgflow serve` and "
        f"`models:/{name}@champion` load.\n\n"
        f"**Promotion log:** one run per alias move (who, why, gate verdict) in the experiment "
        f"[{name}-promotions](#/experiments/{promotions_experiment_id}/runs); "
        "on the command line `imgflow models history`.\n\n"
        f"**Latest registration:** [version {latest}](#/models/{name}/versions/{latest}), "
        f"data version `{card.data_version}`, {card.headline or 'no test metric'}, {verdict}.\n"
    )

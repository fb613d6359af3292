"""What differs between a single-label and a multi-label classification task, in one object.

Callers ask the task instead of branching on its name::

    task = get_task(info.task)          # "singlelabel" | "multilabel", from dataset.json / model.json
    probs = task.probabilities(logits, temperature=spec.temperature)
    chosen = task.decide(probs, thresholds=spec.thresholds)

Only the modules of this package may compare task names; everything else holds a :class:`Task`.
The package sits right above ``components.core`` so that every stage (data, training, baselines,
evaluation, serving) can use it.
"""

from components.task.base import (
    MULTILABEL,
    SINGLELABEL,
    TASK_NAMES,
    Decision,
    Task,
    detect_task,
    get_task,
    label_set,
    task_of,
)

__all__ = [
    "MULTILABEL",
    "SINGLELABEL",
    "TASK_NAMES",
    "Decision",
    "Task",
    "detect_task",
    "get_task",
    "label_set",
    "task_of",
]

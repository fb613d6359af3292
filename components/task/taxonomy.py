"""Label trees: classes as the leaves of a taxonomy (``footwear/Sneaker``), and the arithmetic on them.

A :class:`Taxonomy` holds ``node -> parent`` (``None`` for a top-level node) and the classes (its
leaves) in the model's index order. It comes from label paths (nested class folders, a CSV ``path``
column), from a ``taxonomy.yaml`` (``leaf: parent`` entries, ragged depths allowed) or from the
built-in Fashion-MNIST tree; :meth:`Taxonomy.validate` turns every way a tree can be wrong (a cycle,
a leaf under two parents, a leaf the data does not have, a class the tree does not have) into a
ConfigError (exit 2) naming the node.

The numbers, all pure numpy over (N, K) leaf probabilities:

- :meth:`Taxonomy.distance_matrix`: (K, K) mistake severity, the height of the lowest common
  ancestor (Bertinetto et al., "Making Better Mistakes", CVPR 2020; Karthik et al., ICLR 2021):
  0 on the diagonal, 1 between siblings, the tree's height between leaves sharing only the root.
- :meth:`Taxonomy.node_probabilities`: each inner node's probability = the sum of its leaves'.
- :func:`crm_decode`: conditional risk minimisation, the leaf of least expected tree distance.
- :func:`backoff_decode` / :func:`fit_backoff_threshold`: answer a leaf when it reaches a
  threshold, else its most specific ancestor that does (``parent``) or nothing (``abstain``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from components.core.errors import ConfigError

PATH_SEPARATOR = "/"
TAXONOMY_FILE = "taxonomy.json"
"""Saved in the data version's folder beside ``dataset.json`` (and hashed into the data version)."""
ABSTAIN = ""
"""What :func:`backoff_decode` answers for an image it abstains on."""
BackoffMode = Literal["off", "parent", "abstain"]
BACKOFF_MODES: tuple[str, ...] = ("off", "parent", "abstain")

FASHION_MNIST_TREE: dict[str, str] = {
    "T-shirt/top": "tops",
    "Trouser": "bottoms",
    "Pullover": "tops",
    "Dress": "tops",
    "Coat": "tops",
    "Sandal": "footwear",
    "Shirt": "tops",
    "Sneaker": "footwear",
    "Bag": "accessories",
    "Ankle boot": "footwear",
}
"""The built-in two-level Fashion-MNIST tree (leaf -> parent; the parents are top-level), in the
dataset's class order."""


@dataclass(frozen=True)
class Taxonomy:
    """A label tree over ``leaves`` (the classes, in the model's index order).

    ``parents``: every node except the (implicit) root -> its parent, ``None`` for top-level nodes.
    Build it with :meth:`from_pairs`, :meth:`from_paths`, :meth:`from_yaml` or :meth:`load`, which
    validate it; the constructor itself trusts its arguments.
    """

    parents: Mapping[str, str | None]
    leaves: tuple[str, ...]
    _depth: dict[str, int] = field(default_factory=dict, repr=False, compare=False)

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, str | None]], classes: Sequence[str]) -> Taxonomy:
        """``(child, parent)`` pairs (parent None: top level) over the data's ``classes``; validated.

        A child listed under two different parents is an error naming it, as is everything
        :meth:`validate` checks.
        """
        parents: dict[str, str | None] = {}
        for child, parent in pairs:
            child, parent = str(child).strip(), (None if parent in (None, "") else str(parent).strip())
            if not child:
                raise ConfigError("label tree: an empty node name (check the taxonomy for a blank entry)")
            if child in parents and parents[child] != parent:
                raise ConfigError(
                    f"label tree: {child!r} is under two parents ({parents[child]!r} and {parent!r}); "
                    "each node has exactly one parent"
                )
            parents[child] = parent
        for parent in [p for p in parents.values() if p is not None]:
            parents.setdefault(parent, None)  # an inner node never listed as a child is top-level
        tree = cls(parents=parents, leaves=tuple(classes))
        tree.validate()
        return tree

    @classmethod
    def from_paths(cls, paths: Iterable[str], classes: Sequence[str] | None = None) -> Taxonomy:
        """From label paths such as ``footwear/Sneaker`` (the last part is the class). ``classes``:
        the index order (default: the sorted leaf names)."""
        pairs: list[tuple[str, str | None]] = []
        leaves: list[str] = []
        for path in dict.fromkeys(paths):
            parts = split_path(path)
            leaves.append(parts[-1])
            pairs.extend(zip(parts, [None, *parts[:-1]], strict=True))
        return cls.from_pairs(pairs, classes if classes is not None else sorted(set(leaves)))

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any], classes: Sequence[str]) -> Taxonomy:
        """``{child: parent}`` as a ``taxonomy.yaml`` holds it; a list of parents is an error."""
        pairs: list[tuple[str, str | None]] = []
        for child, parent in mapping.items():
            if isinstance(parent, list | tuple):
                if len(set(parent)) > 1:
                    raise ConfigError(
                        f"label tree: {child!r} is under two parents ({', '.join(map(repr, parent))}); "
                        "each node has exactly one parent"
                    )
                parent = parent[0] if parent else None
            pairs.append((str(child), None if parent is None else str(parent)))
        return cls.from_pairs(pairs, classes)

    @classmethod
    def from_yaml(cls, path: Path, classes: Sequence[str]) -> Taxonomy:
        """A ``taxonomy.yaml`` of ``leaf: parent`` lines (``parent: grandparent`` for deeper trees)."""
        pairs = read_yaml_pairs(path)
        by_child: dict[str, list[str | None]] = {}
        for child, parent in pairs:
            by_child.setdefault(child, []).append(parent)
        for child, listed in by_child.items():
            if len(set(listed)) > 1:
                raise ConfigError(
                    f"{path}: {child!r} is under two parents ({', '.join(map(repr, listed))}); "
                    "each node has exactly one parent"
                )
        return cls.from_pairs(pairs, classes)

    @classmethod
    def fashion_mnist(cls, classes: Sequence[str] | None = None) -> Taxonomy:
        """The built-in tree: tops, bottoms, footwear, accessories."""
        return cls.from_pairs(FASHION_MNIST_TREE.items(), classes or tuple(FASHION_MNIST_TREE))

    # ------------------------------------------------------------------ validation

    def validate(self) -> None:
        """ConfigError naming the node for a cycle, a class the tree lacks, a tree leaf with no data,
        a class that is also an inner node, or duplicate classes."""
        if len(set(self.leaves)) != len(self.leaves):
            raise ConfigError(f"label tree: a class is listed twice in {list(self.leaves)}")
        for node in self.parents:
            self._check_no_cycle(node)
        missing = [c for c in self.leaves if c not in self.parents]
        if missing:
            raise ConfigError(
                f"label tree: class {missing[0]!r} is not in the tree"
                + (f" (nor {', '.join(map(repr, missing[1:]))})" if len(missing) > 1 else "")
                + "; give every class a parent (or put it at the top level)"
            )
        inner = set(self.parents.values()) - {None}
        both = [c for c in self.leaves if c in inner]
        if both:
            raise ConfigError(
                f"label tree: {both[0]!r} is a class and also has children in the tree; a class must be a leaf"
            )
        extra = [n for n in self.parents if n not in inner and n not in self.leaves]
        if extra:
            raise ConfigError(
                f"label tree: leaf {extra[0]!r} is not a class of the data (no image has it); "
                "remove it from the tree or add its images"
            )

    def _check_no_cycle(self, node: str) -> None:
        seen = [node]
        parent = self.parents.get(node)
        while parent is not None:
            if parent in seen:
                loop = " -> ".join([*seen[seen.index(parent) :], parent])
                raise ConfigError(f"label tree: a cycle through {parent!r} ({loop}); a tree has no cycles")
            seen.append(parent)
            parent = self.parents.get(parent)

    # ------------------------------------------------------------------ structure

    def ancestors(self, node: str) -> tuple[str, ...]:
        """``node``'s ancestors, nearest first (the implicit root excluded)."""
        out: list[str] = []
        parent = self.parents.get(node)
        while parent is not None:
            out.append(parent)
            parent = self.parents.get(parent)
        return tuple(out)

    def path(self, leaf: str) -> str:
        """``footwear/Sneaker``: the leaf's path from the top."""
        return PATH_SEPARATOR.join([*reversed(self.ancestors(leaf)), leaf])

    def parent_of(self, leaf: str) -> str:
        """The immediate parent; a top-level leaf is its own parent (it has no coarser answer)."""
        return self.parents.get(leaf) or leaf

    @property
    def inner_nodes(self) -> tuple[str, ...]:
        """Nodes with children, sorted by depth then name (top level first)."""
        inner = {p for p in self.parents.values() if p is not None}
        return tuple(sorted(inner, key=lambda n: (self.depth(n), n)))

    @property
    def nodes(self) -> tuple[str, ...]:
        """Leaves (index order) then inner nodes: the columns of :meth:`membership`."""
        return (*self.leaves, *self.inner_nodes)

    def depth(self, node: str) -> int:
        """1 for a top-level node, 2 for its children, ..."""
        if node not in self._depth:
            self._depth[node] = 1 + len(self.ancestors(node))
        return self._depth[node]

    def height(self) -> int:
        """Edges from the root to the deepest leaf."""
        return max(self.depth(leaf) for leaf in self.leaves)

    def membership(self) -> np.ndarray:
        """(K, M) 0/1: leaf k lies under node m, for m over :attr:`nodes` (a leaf lies under itself)."""
        col = {n: j for j, n in enumerate(self.nodes)}
        out = np.zeros((len(self.leaves), len(col)), dtype=np.float64)
        for k, leaf in enumerate(self.leaves):
            for node in (leaf, *self.ancestors(leaf)):
                out[k, col[node]] = 1.0
        return out

    def node_probabilities(self, probs: np.ndarray) -> np.ndarray:
        """probs: (N, K) leaf probabilities -> (N, M) per node of :attr:`nodes` (parent = sum of children)."""
        return np.asarray(probs, dtype=np.float64) @ self.membership()

    def parent_probabilities(self, probs: np.ndarray) -> dict[str, np.ndarray]:
        """Inner node -> (N,) probability, the sum of its leaves' (serving's parent probabilities)."""
        p = self.node_probabilities(probs)
        k = len(self.leaves)
        return {node: p[:, k + j] for j, node in enumerate(self.inner_nodes)}

    def distance_matrix(self) -> np.ndarray:
        """(K, K) mistake severity: the height of the leaves' lowest common ancestor.

        Height of a node = edges down to its deepest leaf; the implicit root has the tree's height.
        Siblings are 1 apart; leaves sharing only the root are :meth:`height` apart.
        """
        node_height = self._node_heights()
        root_height = self.height()
        k = len(self.leaves)
        chains = [(leaf, *self.ancestors(leaf)) for leaf in self.leaves]
        out = np.zeros((k, k), dtype=np.float64)
        for i in range(k):
            on_path = set(chains[i])
            for j in range(i + 1, k):
                lca = next((n for n in chains[j] if n in on_path), None)
                out[i, j] = out[j, i] = root_height if lca is None else node_height[lca]
        return out

    def _node_heights(self) -> dict[str, int]:
        heights: dict[str, int] = {}
        for leaf in self.leaves:
            for up, node in enumerate((leaf, *self.ancestors(leaf))):
                heights[node] = max(heights.get(node, 0), up)
        return heights

    # ------------------------------------------------------------------ persistence

    def to_dict(self) -> dict[str, Any]:
        return {"leaves": list(self.leaves), "parents": dict(sorted(self.parents.items()))}

    def save(self, path: Path) -> None:
        """Write ``taxonomy.json`` atomically (stages read it later)."""
        from components.core.jsonio import write_json

        write_json(path, self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Taxonomy:
        return cls.from_pairs(raw["parents"].items(), tuple(raw["leaves"]))

    @classmethod
    def load(cls, path: Path) -> Taxonomy:
        return cls.from_dict(json.loads(Path(path).read_text()))


def load_taxonomy(data_dir: Path) -> Taxonomy | None:
    """The data version's tree (``<data_dir>/taxonomy.json``), or None for flat labels."""
    file = Path(data_dir) / TAXONOMY_FILE
    return Taxonomy.load(file) if file.is_file() else None


def split_path(path: str) -> list[str]:
    """``" footwear / Sneaker "`` -> ``["footwear", "Sneaker"]``; an empty part is an error."""
    parts = [p.strip() for p in str(path).split(PATH_SEPARATOR)]
    if not all(parts):
        raise ConfigError(f"label path {path!r} has an empty part: write it as parent/child")
    return parts


def read_yaml_pairs(path: Path) -> list[tuple[str, str | None]]:
    """``child: parent`` entries of a YAML mapping in file order, duplicates kept (so a leaf listed
    under two parents can be named, which a plain ``yaml.safe_load`` would silently overwrite)."""
    import yaml

    try:
        root = yaml.compose(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read the taxonomy {path}: {e}") from e
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}: expected a mapping of 'leaf: parent' lines")
    pairs: list[tuple[str, str | None]] = []
    for key, value in root.value:
        if not isinstance(key, yaml.ScalarNode) or not isinstance(value, yaml.ScalarNode):
            raise ConfigError(
                f"{path}: line {key.start_mark.line + 1}: expected 'leaf: parent' (one name each)"
            )
        is_null = value.tag.endswith(":null") or value.value in ("", "~", "null")
        pairs.append((key.value, None if is_null else value.value))
    return pairs


# ---------------------------------------------------------------------- decoding


def expected_distance(probs: np.ndarray, distance: np.ndarray) -> np.ndarray:
    """(N, K) expected tree distance of answering each leaf, under probs (N, K)."""
    return np.asarray(probs, dtype=np.float64) @ np.asarray(distance, dtype=np.float64)


def crm_decode(probs: np.ndarray, distance: np.ndarray, *, k: int = 1) -> np.ndarray:
    """Conditional risk minimisation (Karthik et al., ICLR 2021): (N, k) leaf indices in order of
    least expected distance. Ties go to the more probable leaf (so a flat tree decodes as argmax)."""
    risk = expected_distance(probs, distance)
    order = np.lexsort((-np.asarray(probs), risk), axis=1)
    return order[:, :k]


def argmax_decode(probs: np.ndarray, *, k: int = 1) -> np.ndarray:
    """(N, k) leaf indices by decreasing probability (ties: lower index first)."""
    return np.argsort(-np.asarray(probs), axis=1, kind="stable")[:, :k]


def backoff_decode(
    probs: np.ndarray, tree: Taxonomy, *, threshold: float, mode: BackoffMode = "parent"
) -> list[str]:
    """Per image the answer under back-off: the top leaf when its probability reaches ``threshold``;
    else (``parent``) the most specific ancestor whose summed probability does, preferring the more
    probable at equal depth; else :data:`ABSTAIN`. ``off``: always the top leaf.

    probs: (N, K), temperature already applied.
    """
    probs = np.asarray(probs, dtype=np.float64)
    top = probs.argmax(axis=1)
    leaves = tree.leaves
    if mode == "off":
        return [leaves[i] for i in top]
    node_p = tree.node_probabilities(probs)
    depth = np.array([tree.depth(n) for n in tree.nodes], dtype=np.float64)
    allowed = np.ones(len(depth), dtype=bool)
    if mode == "abstain":  # only leaves may answer
        allowed[len(leaves) :] = False
    ok = (node_p >= threshold) & allowed
    # Most specific first, then most probable: depth is an integer, probability adds < 1 to it.
    key = np.where(ok, depth + 0.5 * node_p, -np.inf)
    best = key.argmax(axis=1)
    sure = probs[np.arange(len(probs)), top] >= threshold
    nodes = tree.nodes
    some: list[bool] = np.asarray(ok.any(axis=1)).tolist()
    return [
        leaves[t] if s else (nodes[b] if o else ABSTAIN)
        for t, s, b, o in zip(top, sure, best, some, strict=True)
    ]


def answer_correct(answers: Sequence[str], labels: Sequence[int] | np.ndarray, tree: Taxonomy) -> np.ndarray:
    """(N,) bool: the answer is the true leaf or one of its ancestors (abstentions: False)."""
    column = {n: j for j, n in enumerate(tree.nodes)}
    under = tree.membership()  # (K, M): leaf k lies under node m
    return np.array(
        [a != ABSTAIN and bool(under[y, column[a]]) for a, y in zip(answers, labels, strict=True)], dtype=bool
    )


@dataclass(frozen=True)
class BackoffFit:
    """The threshold fitted for a target precision, and what it gave on the fitting split."""

    mode: str
    threshold: float
    target_precision: float
    precision: float
    answered: float
    """Share of images answered (a leaf, or with ``parent`` an ancestor)."""
    leaf_share: float
    """Share answered with a leaf."""
    reached: bool
    """Whether any threshold reached the target on the fitting split."""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def backoff_outcome(
    answers: Sequence[str], labels: Sequence[int] | np.ndarray, tree: Taxonomy
) -> tuple[float, float, float]:
    """(precision over answered, answered share, leaf-answer share) of back-off answers."""
    answered = np.array([a != ABSTAIN for a in answers], dtype=bool)
    leaf = np.array([a in tree.leaves for a in answers], dtype=bool)
    correct = answer_correct(answers, labels, tree)
    precision = float(correct[answered].mean()) if answered.any() else 1.0
    return (
        precision,
        float(answered.mean()) if len(answers) else 0.0,
        float(leaf.mean()) if len(answers) else 0.0,
    )


def fit_backoff_threshold(
    probs: np.ndarray,
    labels: Sequence[int] | np.ndarray,
    tree: Taxonomy,
    *,
    target_precision: float,
    mode: BackoffMode = "parent",
    candidates: int = 200,
    confidence: float | None = 0.95,
) -> BackoffFit:
    """The lowest threshold whose back-off answers reach ``target_precision`` on this (calibration)
    split: the lowest such threshold answers the most leaves. probs: (N, K), temperature applied;
    labels: (N,) true leaf indices. Candidates: observed top-leaf confidences (and 1.0).
    ``confidence``: the target must hold for the Wilson lower bound of the split's precision at this
    level, not just its point value: a threshold chosen where the calibration split only just reaches
    the target lands below it on new images about half the time (Fashion-MNIST: 0.9717 on test for a
    point fit at 0.975). None: the point value.
    When none reaches the target the strictest candidate is returned with ``reached=False``."""
    if mode == "off":
        raise ValueError("backoff mode 'off' has no threshold to fit")
    probs = np.asarray(probs, dtype=np.float64)
    conf = probs.max(axis=1)
    # Observed confidences (quantiles that are data points): small splits get every one of them.
    levels = np.quantile(conf, np.linspace(0, 1, candidates), method="inverted_cdf")
    grid = np.unique(np.concatenate([levels, [1.0]]))
    last: BackoffFit | None = None
    for tau in grid:
        answers = backoff_decode(probs, tree, threshold=float(tau), mode=mode)
        precision, answered, leaf = backoff_outcome(answers, labels, tree)
        bound = (
            precision if confidence is None else _precision_bound(precision, answered, len(conf), confidence)
        )
        last = BackoffFit(
            mode, float(tau), target_precision, precision, answered, leaf, bound >= target_precision
        )
        if last.reached:
            return last
    assert last is not None
    return last


def _precision_bound(precision: float, answered: float, n: int, confidence: float) -> float:
    """Wilson lower bound of a precision measured over ``answered * n`` answers."""
    from components.task.metrics import wilson_interval

    m = int(round(answered * n))
    return wilson_interval(int(round(precision * m)), m, confidence=confidence)[0] if m else 0.0


# ---------------------------------------------------------------------- shipped with a model

HIERARCHY_FILE = "hierarchy.json"
"""The tree and the fitted back-off rule, written by evaluate and shipped in the model folder."""


@dataclass(frozen=True)
class ShippedTree:
    """What a served model knows about its label tree: paths, parent probabilities, back-off."""

    tree: Taxonomy
    backoff: str = "off"
    threshold: float = 1.0

    def fields(self, probs: np.ndarray) -> list[dict[str, Any]]:
        """Per image: ``path`` of the top leaf, its ``parent`` and ``parent_probability`` (sum of the
        parent's children), every inner node's probability (``parent_probabilities``) and, with
        back-off on, ``answer`` (a leaf, an ancestor, or null: abstained). probs: (N, K) calibrated."""
        probs = np.asarray(probs, dtype=np.float64)
        node_p = self.tree.node_probabilities(probs)
        column = {n: j for j, n in enumerate(self.tree.nodes)}
        inner = self.tree.inner_nodes
        out: list[dict[str, Any]] = []
        for i, top in enumerate(probs.argmax(axis=1) if len(probs) else []):
            leaf = self.tree.leaves[top]
            parent = self.tree.parent_of(leaf)
            out.append({
                "path": self.tree.path(leaf),
                "parent": parent,
                "parent_probability": float(node_p[i, column[parent]]),
                "parent_probabilities": {n: float(node_p[i, column[n]]) for n in inner},
            })  # fmt: skip
        if self.backoff != "off" and out:
            answers = backoff_decode(probs, self.tree, threshold=self.threshold, mode=self.backoff)  # type: ignore[arg-type]
            for rec, answer in zip(out, answers, strict=True):
                rec["answer"] = answer or None
        return out

    def save(self, out_dir: Path) -> Path:
        from components.core.jsonio import write_json

        Path(out_dir).mkdir(parents=True, exist_ok=True)
        payload = {"tree": self.tree.to_dict(), "backoff": self.backoff, "threshold": self.threshold}
        return write_json(Path(out_dir) / HIERARCHY_FILE, payload, sort_keys=True)


def load_hierarchy(model_dir: Path) -> ShippedTree | None:
    """The model's label tree and back-off rule, or None when its folder has none (flat labels)."""
    file = Path(model_dir) / HIERARCHY_FILE
    if not file.is_file():
        return None
    raw = json.loads(file.read_text())
    return ShippedTree(Taxonomy.from_dict(raw["tree"]), str(raw.get("backoff", "off")),
                       float(raw.get("threshold", 1.0)))  # fmt: skip

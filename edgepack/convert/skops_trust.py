"""The scikit-learn types a .skops file may hold without ``--trust``, beyond skops' own defaults, and why.

skops refuses to load a type that is not on its default trust list unless the caller names it. Most
fitted tree ensembles and MLPs hold such a type, although it is one of scikit-learn's own and skops
rebuilds it with its own loader. A type is listed here only when both hold:

1. **Rebuilt from plain data.** skops makes it with a loader that calls no function the file chooses:
   the constructor is fixed by the loader or is the class itself, and its arguments and state are
   arrays (read by ``np.load(allow_pickle=False)``), numbers, strings and containers, each of them a
   node skops audits in turn. (A trusted name admits that class under whichever loader the file
   names; every loader that can build it still calls only the class's own ``__new__``/``__init__``/
   ``__setstate__`` or ``__dict__.update``.)
2. **Safe to run once loaded.** Where scikit-learn's compiled code indexes memory with numbers from
   the file (a tree's child and feature indices, unchecked: skops' ``UNTRUSTED_TYPE_REASONS`` and
   scikit-learn PR #34558), edgepack checks every such number against the arrays it indexes, after
   loading and before anything runs the model (``check_admitted``). A file that fails is refused as
   damaged; one whose content cannot be checked (categorical splits) still needs ``--trust``.

A type the user names with ``--trust`` is their word and is not checked; one admitted by this list is.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np

from edgepack.errors import InputError

TREE = "sklearn.tree._tree.Tree"
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"

SAFE_TYPES: dict[str, str] = {
    # DecisionTree*, RandomForest*, ExtraTrees*, GradientBoosting*, IsolationForest, AdaBoost.
    TREE: "skops' TreeNode rebuilds it as Tree(n_features, n_classes, n_outputs) (the constructor is fixed "
          "by the loader, not read from the file) and Tree.__setstate__ copies the node and value arrays, "
          "checking their dtype and shape; no __reduce__ of the file runs. The node indices are checked "
          "by _check_tree before the model runs.",
    # HistGradientBoosting*.
    TREE_PREDICTOR: "a plain Python class: skops' ObjectNode makes it with __new__ and sets its attributes "
                    "(the nodes array and two bitset arrays). The node indices are checked by "
                    "_check_predictor before the model runs; categorical splits are not checked, and "
                    "still need --trust.",
    # MLPClassifier/MLPRegressor with solver="adam" or "sgd" keep their optimizer after fit.
    "sklearn.neural_network._stochastic_optimizers.AdamOptimizer":
        "a plain Python class holding numbers and lists of arrays (params, ms, vs); ObjectNode makes it "
        "with __new__ and sets its attributes. predict never calls it (only further training does).",
    "sklearn.neural_network._stochastic_optimizers.SGDOptimizer":
        "as AdamOptimizer: numbers and lists of arrays (velocities); predict never calls it.",
    # ColumnTransformer and SimpleImputer record dtypes.
    "numpy.dtype": "skops' DTypeNode takes the dtype of an empty array it reads with "
                   "np.load(allow_pickle=False) (or of an object array whose items are audited nodes); "
                   "a dtype is data, never code.",
}


def admitted(untrusted: list[str], trust: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """``(admitted, refused)``: the untrusted types this list admits (the user did not name them), and
    those still needing ``--trust``."""
    admitted_ = [name for name in untrusted if name in SAFE_TYPES and name not in trust]
    refused = [name for name in untrusted if name not in SAFE_TYPES and name not in trust]
    return admitted_, refused


def check_admitted(model: Any, admitted_types: list[str], file_name: str) -> None:
    """Check the content of every object of an admitted type that scikit-learn's compiled code indexes
    with; InputError if it is inconsistent (damaged or crafted) or cannot be checked."""
    checked = [name for name in (TREE, TREE_PREDICTOR) if name in admitted_types]
    if not checked:
        return
    objects = list(_objects(model))
    problems: list[str] = []
    unchecked: set[str] = set()
    if TREE in checked:
        problems += _tree_problems(objects, unchecked)
    if TREE_PREDICTOR in checked:
        problems += _predictor_problems(objects, unchecked)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"{file_name} is not a consistent scikit-learn model: {problems[0]}{more}",
                         "the file is damaged or was made to crash its reader; save the model again with skops.io.dump")
    if unchecked:
        names = sorted(unchecked)
        raise InputError(f"{file_name} holds {', '.join(names)} whose content edgepack cannot check "
                         f"({'; '.join(_UNCHECKED_WHY[n] for n in names)})",
                         "review the file, then pass " + " ".join(f"--trust {name}" for name in names))


_UNCHECKED_WHY = {
    TREE: "a tree outside the estimators that run it, or whose estimator records no input width",
    TREE_PREDICTOR: "categorical splits, a preprocessor, or no recorded input width",
}


def _objects(root: Any) -> Iterator[Any]:
    """Every object reachable from ``root`` through attributes, containers and object arrays, once."""
    seen: set[int] = set()
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in seen or isinstance(item, (str, bytes, int, float, bool, type(None), type, ModuleType)):
            continue  # classes and modules are code, not the model's state
        seen.add(id(item))
        yield item
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            if item.dtype == object:
                stack.extend(item.ravel().tolist())
        elif hasattr(item, "__dict__"):
            stack.extend(vars(item).values())


# -- sklearn.tree._tree.Tree -------------------------------------------------------------------------

def _tree_problems(objects: list[Any], unchecked: set[str]) -> list[str]:
    from sklearn.tree._tree import Tree

    problems = []
    owned: set[int] = set()
    for item in objects:
        tree = getattr(item, "tree_", None)
        if isinstance(tree, Tree):
            owned.add(id(tree))
            width = getattr(item, "n_features_in_", None)
            where = f"{type(item).__name__}.tree_"
            if not isinstance(width, (int, np.integer)):
                unchecked.add(TREE)  # without it, scikit-learn does not check the input's width either
            elif int(width) != tree.n_features:
                problems.append(f"{where} splits {tree.n_features} features, its estimator takes {width}")
            problems += _check_tree(tree, where)
        problems += _ensemble_problems(item, unchecked)
    if any(isinstance(item, Tree) and id(item) not in owned for item in objects):
        unchecked.add(TREE)
    if not problems:  # the gradient boosting probe runs the init estimator: only on checked trees
        problems += [p for item in reversed(objects) for p in _gradient_boosting_problems(item)]
    return problems


def _check_tree(tree: Any, where: str) -> list[str]:
    """Child indices inside the tree and after their parent (so every walk ends at a leaf), one parent
    per node, features inside the tree's width, depth within max_depth (decision_path sizes by it)."""
    count = tree.node_count
    # The node arrays scikit-learn hands out are node_count long over capacity stored nodes: compare
    # the two numbers before reading any array.
    if count != tree.capacity or count < 1:
        return [f"{where} records {count} nodes and stores {tree.capacity}"]
    left, right, feature = tree.children_left, tree.children_right, tree.feature
    leaf = left == -1
    if np.any(leaf != (right == -1)):
        return [f"{where} has a node with one child"]
    index = np.flatnonzero(~leaf)
    children = np.concatenate([left[index], right[index]])
    parents = np.concatenate([index, index])
    if np.any((children <= parents) | (children >= count)):
        return [f"{where} has a child index outside the tree or before its parent"]
    if np.unique(children).size != children.size:
        return [f"{where} has a node with two parents"]
    if np.any((feature[index] < 0) | (feature[index] >= tree.n_features)):
        return [f"{where} splits on a feature outside its {tree.n_features}"]
    depth, level = 0, np.array([0])
    while True:
        inner = level[~leaf[level]]
        if inner.size == 0:
            break
        level = np.concatenate([left[inner], right[inner]])
        depth += 1
    if depth > tree.max_depth:
        return [f"{where} is {depth} deep and records max_depth {tree.max_depth}"]
    return []


def _ensemble_problems(item: Any, unchecked: set[str]) -> list[str]:
    """The trees of an ensemble take at most the ensemble's width (forests run them unchecked on its
    input), and at most their column subset's width where the ensemble records one (bagging)."""
    members = getattr(item, "estimators_", None)
    if not isinstance(members, (list, tuple, np.ndarray)):
        return []
    members = members.ravel().tolist() if isinstance(members, np.ndarray) else list(members)
    owners = [m for m in members if hasattr(m, "tree_")]
    if not owners:
        return []
    width = getattr(item, "n_features_in_", None)
    if not isinstance(width, (int, np.integer)):
        unchecked.add(TREE)
        return []
    subsets = getattr(item, "estimators_features_", None)
    problems = []
    for index, member in enumerate(owners):
        taken = getattr(member, "n_features_in_", None)
        if not isinstance(taken, (int, np.integer)):
            continue  # _tree_problems marks it unchecked
        limit = int(width)
        if subsets is not None:
            limit = min(limit, len(subsets[index]) if index < len(subsets) else -1)
        if int(taken) > limit:
            problems.append(f"{type(item).__name__}.estimators_[{index}] takes {taken} features of {limit}")
    return problems


def _gradient_boosting_problems(item: Any) -> list[str]:
    """GradientBoosting* adds tree k of each stage into column k of the init estimator's predictions,
    unchecked: their widths must agree."""
    members = getattr(item, "estimators_", None)
    if not hasattr(item, "_raw_predict_init") or not isinstance(members, np.ndarray):
        return []
    name = type(item).__name__
    if members.ndim != 2 or members.size == 0:
        return [f"{name}.estimators_ is not a table of stages x trees"]
    try:
        start = item._raw_predict_init(np.zeros((1, int(item.n_features_in_)), dtype=np.float32))
    except Exception as err:  # the init estimator refuses its own width: inconsistent either way
        return [f"{name}'s init estimator fails ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"]
    if np.ndim(start) != 2 or np.shape(start)[1] != members.shape[1]:
        return [f"{name} has {members.shape[1]} trees per stage for {np.shape(start)[-1]} outputs"]
    return []


# -- sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor --------------------------------

def _predictor_problems(objects: list[Any], unchecked: set[str]) -> list[str]:
    from sklearn.ensemble._hist_gradient_boosting.predictor import TreePredictor

    problems = []
    owned: set[int] = set()
    for item in objects:
        stages = getattr(item, "_predictors", None)
        if not isinstance(stages, list):
            continue
        width = getattr(item, "n_features_in_", None)
        if getattr(item, "_preprocessor", None) is not None or not isinstance(width, (int, np.integer)):
            unchecked.add(TREE_PREDICTOR)  # the trees then see a transformed input of another width
            width = None
        for stage, predictors in enumerate(stages):
            for k, predictor in enumerate(predictors if isinstance(predictors, list) else [predictors]):
                if isinstance(predictor, TreePredictor):
                    owned.add(id(predictor))
                    problems += _check_predictor(predictor, f"{type(item).__name__}._predictors[{stage}][{k}]",
                                                 width, unchecked)
    if any(isinstance(item, TreePredictor) and id(item) not in owned for item in objects):
        unchecked.add(TREE_PREDICTOR)
    return problems


def _check_predictor(predictor: Any, where: str, width: int | None, unchecked: set[str]) -> list[str]:
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    nodes = getattr(predictor, "nodes", None)
    if not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1 or not nodes.size:
        return [f"{where} has no node array of scikit-learn's record type"]
    count = len(nodes)
    index = np.flatnonzero(nodes["is_leaf"] == 0)
    children = np.concatenate([nodes["left"][index], nodes["right"][index]]).astype(np.int64)
    parents = np.concatenate([index, index])
    if np.any((children <= parents) | (children >= count)):
        return [f"{where} has a child index outside the tree or before its parent"]
    features = nodes["feature_idx"][index].astype(np.int64)
    if width is not None and np.any((features < 0) | (features >= width)):
        return [f"{where} splits on a feature outside the model's {width}"]
    if np.any(nodes["is_categorical"][index]):
        unchecked.add(TREE_PREDICTOR)  # bitset indices into arrays built at predict time
    return []

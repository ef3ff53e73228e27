"""Which model family the train stage registers: `train.model: xgboost | linear | auto`.

Why this shape:
- Both candidates are fit on every run on the same id-hash holdout (xgboost by tasks/training.py,
  the linear model by tasks/baseline.py), so choosing is a comparison of two numbers already there.
- `auto` registers xgboost only where it would pass the blessing rule against the linear model
  (a gain > 0 and >= `train.baseline_margin` on the primary metric, as tasks/registry.py applies);
  otherwise the linear model, which then *is* the baseline. So `auto` never registers a model the
  register stage would refuse for losing to the baseline (on the bundled sample the linear model
  scores 0.830 against xgboost's 0.819 and is what the quickstart deploys).
- The choice and its reason go into the run's tags and the TrainedModel record, so "why is this a
  linear model?" has an answer where the model is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lifecycle.errors import LifecycleError
from lifecycle.spec import DatasetSpec

Family = Literal["xgboost", "linear"]
TAG = "lifecycle.model."


@dataclass(frozen=True)
class FamilyChoice:
    """The family registered, why, and under which `train.model` setting."""

    family: Family
    reason: str
    mode: str

    def tags(self) -> dict[str, str]:
        return {f"{TAG}family": self.family, f"{TAG}choice": self.mode, f"{TAG}reason": self.reason[:500]}


def choose_family(spec: DatasetSpec, metric: str, greater_is_better: bool, xgboost: dict[str, float],
                  linear: dict[str, float] | None) -> FamilyChoice:
    """The family to register from both candidates' holdout metrics (`linear` None: no linear model fit).

    Raises:
        LifecycleError: `train.model: linear` but no linear model could be fit.
    """
    mode = spec.train.model
    if mode == "xgboost":
        return FamilyChoice("xgboost", "train.model: xgboost", mode)
    if linear is None or metric not in linear:
        if mode == "linear":
            raise LifecycleError(f"{spec.name}: train.model is linear but no linear model could be fit "
                                 "(an empty side of the split or one class on the train side)")
        return FamilyChoice("xgboost", "auto: no linear model could be fit, xgboost is the only candidate", mode)
    if mode == "linear":
        return FamilyChoice("linear", "train.model: linear", mode)
    x, b, margin = float(xgboost[metric]), float(linear[metric]), spec.train.baseline_margin
    gain = x - b if greater_is_better else b - x
    facts = f"xgboost {metric} {x:.4f} vs linear {b:.4f}"
    if gain > 0 and gain >= margin:
        return FamilyChoice("xgboost", f"auto: {facts}, xgboost better by {gain:.4f}", mode)
    by = f" by the margin {margin:g}" if margin and gain > 0 else ""
    return FamilyChoice("linear", f"auto: {facts}, xgboost not better{by}", mode)

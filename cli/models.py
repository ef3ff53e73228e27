"""`lifecycle promote` / `lifecycle rollback`: move a dataset model's `@champion` by hand, audited.

Both write a PromotionAudit record and tag the model versions in MLflow; `promote` judges the version
against the current champion on its own holdout (as the register stage does) unless `--force`.
Exit codes: 0 moved, 1 refused or failed (one line on stderr).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cli.console import console, err_console, fail, prepare_env
from lifecycle.errors import LifecycleError


def trained_fact(trained) -> str:
    """A TrainedModel in one cell: its family and metric, and the baseline's beside it."""
    metric = trained.primary_metric
    text = f"{trained.family} · {metric} {trained.metrics.get(metric, float('nan')):.4f}"
    base = trained.baseline_metrics.get(metric)
    return text + (f" · baseline {base:.4f}" if base is not None else "") + \
        (f" · {trained.layout} layout" if trained.layout else "")


def registered_fact(model, decision: bool = False) -> str:
    """A ModelVersion in one cell: version, aliases, and whether it earned its place (beats the baseline);
    with `decision`, the promotion decision too (which already carries the baseline's verdict)."""
    role = "champion" if model.promoted else "challenger (not promoted)"
    if decision:
        return f"{model.model_name} v{model.version} · {role} · {model.decision}"
    verdict = f" · {model.baseline_verdict}" if model.baseline_verdict else ""
    return f"{model.model_name} v{model.version} · {role}{verdict}"


def _spec(store, target, dataset: str, version: str, spec_path: Path | None):
    """--spec when given (it must be the dataset's), else the spec the version was trained with."""
    from lifecycle.spec import load_spec
    from tasks.promotion import judging_spec

    if spec_path is None:
        return judging_spec(store, target, dataset, version)
    spec = load_spec(spec_path)
    if spec.name != dataset:
        raise LifecycleError(f"{spec_path}: spec is for dataset {spec.name!r}, not {dataset!r}")
    return spec


def _moved(audit) -> None:
    console.print(f"{audit.model_name}@champion → v{audit.version}: {audit.decision}  (audit {audit.id})",
                  soft_wrap=True)


def promote(
    dataset: str = typer.Argument(..., help="Dataset name (the registered model is the profile's prefix + it)."),
    version: str = typer.Argument(..., help="Registry version to make the champion."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Spec to judge with (default: the version's own)."),
    force: bool = typer.Option(False, "--force", help="Promote without comparing with the champion."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit record and MLflow tags)."),
    profile: str = typer.Option("local", help="Profile in deployments/profiles or a YAML path."),
) -> None:
    """Make VERSION the champion if it beats the current one on its holdout (or --force); audited."""

    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from tasks.promotion import promote_version

        targets = load_profile(profile)
        dataset_spec = _spec(targets.store, targets.mlflow, dataset, version, spec)
        audit = promote_version(dataset_spec, targets.store, targets.mlflow, version, force=force, reason=reason)
    except LifecycleError as exc:
        fail(exc)
    if audit.moved:
        _moved(audit)
        return
    why = audit.decision.removeprefix("not promoted: ")  # the baseline gate's decision starts with it too
    err_console.print(f"[bold yellow]not promoted:[/] {why}  (audit {audit.id})", soft_wrap=True,
                      highlight=False)
    raise typer.Exit(code=1)


def rollback(
    dataset: str = typer.Argument(..., help="Dataset name."),
    reason: str = typer.Option("", "--reason", help="Why (kept in the audit record and MLflow tags)."),
    profile: str = typer.Option("local", help="Profile in deployments/profiles or a YAML path."),
) -> None:
    """Point @champion back at the version the current champion replaced (from the audit chain)."""

    prepare_env()
    try:
        from infra_blocks.profiles import load_profile
        from tasks.promotion import rollback_champion

        targets = load_profile(profile)
        audit = rollback_champion(dataset, targets.store, targets.mlflow, reason=reason)
    except LifecycleError as exc:
        fail(exc)
    _moved(audit)

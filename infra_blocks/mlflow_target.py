"""MlflowTarget: the tracking server and model registry the train and register stages talk to."""

from __future__ import annotations

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class MlflowTarget(Block):
    """An MLflow tracking server / registry (SQLite file locally, a server on PostgreSQL in production).

    Attributes:
        tracking_uri: e.g. `sqlite:////abs/.lifecycle/mlflow.db` or `http://mlflow:5000`.
        registry_uri: Defaults to the tracking URI.
        experiment: Experiment that training runs are logged to.
        model_name_prefix: Registered model name = prefix + dataset name.
        artifact_location: Where a new experiment stores artifacts (file:// or s3://); None = server default.
        tracking_token: Bearer token for a protected tracking server.
    """

    _block_type_name = "Lifecycle MLflow Target"
    _block_type_slug = "lifecycle-mlflow-target"
    _description = "MLflow tracking server and model registry for training runs and model versions."

    tracking_uri: str = Field(..., description="MLflow tracking URI.")
    registry_uri: str | None = Field(None, description="Model registry URI (default: tracking URI).")
    experiment: str = Field("lifecycle", description="Experiment for training runs.")
    model_name_prefix: str = Field("", description="Prefix of registered model names.")
    artifact_location: str | None = Field(None, description="Artifact root for new experiments.")
    tracking_token: SecretStr | None = Field(None, description="Bearer token for the tracking server.")

    def model_name(self, dataset: str) -> str:
        return f"{self.model_name_prefix}{dataset}"

    def client(self):
        """An `MlflowClient` bound to this target (no process-global state is changed)."""
        from mlflow.tracking import MlflowClient

        self.apply_env()
        return MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri or self.tracking_uri)

    def apply_env(self) -> None:
        """Point the `mlflow` fluent API at this target (it is process-global by MLflow's design)."""
        import os

        import mlflow

        if self.tracking_token:
            os.environ["MLFLOW_TRACKING_TOKEN"] = self.tracking_token.get_secret_value()
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri or self.tracking_uri)

    def experiment_id(self) -> str:
        client = self.client()
        exp = client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        return client.create_experiment(self.experiment, artifact_location=self.artifact_location)

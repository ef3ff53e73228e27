"""Typed Prefect blocks, one per kind of infrastructure target the lifecycle uses."""

from infra_blocks.dask_compute import DaskCompute
from infra_blocks.mlflow_target import MlflowTarget
from infra_blocks.object_store import ObjectStore
from infra_blocks.serving_target import ServingTarget
from infra_blocks.vector_store import VectorStore

ALL_BLOCKS = (ObjectStore, DaskCompute, MlflowTarget, VectorStore, ServingTarget)

__all__ = ["ALL_BLOCKS", "DaskCompute", "MlflowTarget", "ObjectStore", "ServingTarget", "VectorStore"]

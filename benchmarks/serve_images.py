"""Serving benchmark, image sizes: our tabular serving image against the same model served by MLflow
in an image built the same way (serve.py runs it after the request figures; `--skip-images` leaves it out)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx

REF_DOCKERFILE = """ARG DEPS_IMAGE
FROM ${DEPS_IMAGE}
COPY model /model
USER 10001:10001
EXPOSE 8080
CMD ["mlflow", "models", "serve", "-m", "/model", "--env-manager", "local", "-h", "0.0.0.0", "-p", "8080"]
"""


def image_sizes(rec: Any, work: Path) -> None:
    """Our tabular serving image against the same model served by MLflow in an image built the same way.

    Both start from the same base image and install offline from the same wheelhouse; the reference
    installs `mlflow` + the model's pip requirements (what `pip install mlflow` + requirements.txt
    gives) and runs `mlflow models serve`. The reference is started once to prove it serves.
    """
    import io

    from serving.pyfunc import pip_requirements
    from tasks import docker_images as di
    from tasks.serving_common import tar

    try:
        client = di.docker_client(None)
        base = os.environ.get("LIFECYCLE_BASE_IMAGE", "lifecycle-base:bookworm")
        di.base_image(client, base)
    except Exception as exc:  # noqa: BLE001 - no docker here: say so, measure the rest
        print(f"  image sizes skipped: {exc}")
        return
    model_dir, pyfunc = work / "tabular-model", work / "tabular-pyfunc" / "model"
    ours = di.build_app_image(client, di.deps_image(client, base, with_search=False), model_dir,
                              {"deployment_id": "bench-image-size"})
    roots = ["mlflow", *(r.split("==")[0] for r in pip_requirements(False))]
    ref_deps = di.deps_image(client, base, False, roots=roots, kind="mlflow")
    entries: list[tuple[str, Path | bytes, int, int]] = [("Dockerfile", REF_DOCKERFILE.encode(), 0o644, 0)]
    entries += [(f"model/{p.relative_to(pyfunc).as_posix()}", p, 0o644, 0)
                for p in sorted(pyfunc.rglob("*")) if p.is_file()]
    ref, _ = client.images.build(fileobj=io.BytesIO(tar(entries)), custom_context=True,
                                 tag="lifecycle-bench:mlflow-ref", buildargs={"DEPS_IMAGE": ref_deps}, rm=True,
                                 forcerm=True, pull=False)
    container = client.containers.run(ref.id, detach=True, ports={"8080/tcp": ("127.0.0.1", None)})
    try:
        deadline, ok = time.monotonic() + 120, False
        while time.monotonic() < deadline and not ok:
            container.reload()
            port = ((container.attrs["NetworkSettings"]["Ports"] or {}).get("8080/tcp") or [{}])[0].get("HostPort")
            try:
                ok = bool(port) and httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.5)
        if not ok:
            raise RuntimeError(f"the mlflow reference image does not serve: {container.logs(tail=10).decode()}")
    finally:
        container.remove(force=True)
    ours_mb, ref_mb = ours.attrs["Size"] / 1e6, ref.attrs["Size"] / 1e6
    base_mb = client.images.get(base).attrs["Size"] / 1e6
    print(f"  images: ours {ours_mb:.0f} MB, mlflow reference {ref_mb:.0f} MB (base {base_mb:.0f} MB)")
    rec("serve.image.size (tabular model, core image)", ours_mb, "MB",
           baseline=f"same base ({base_mb:.0f} MB) + mlflow + the model's requirements, offline, `mlflow models serve`",
           baseline_value=ref_mb, higher_is_better=False, goal="smaller than the mlflow image")
    search = di.image_exists(client, di.deps_spec(client, base, True)[0])
    if search is not None:
        rec("serve.image.size (search image: + LanceDB, torch CPU, MiniLM)", search.attrs["Size"] / 1e6, "MB",
               goal="reported (no mlflow+torch reference built)")

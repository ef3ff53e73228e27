"""`python -m serving --config FILE`: run one server for one deployment snapshot.

One uvicorn process, no reload, access log off, log level warning: the deploy task starts this as a
detached process group, watches `/health`, and stops the group by PID. A config or model that cannot
be loaded exits with status 2 and one line on stderr (the deploy task shows the log's tail).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lifecycle.errors import LifecycleError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving", description="Serve one lifecycle deployment.")
    parser.add_argument("--config", required=True, help="Path of the snapshot's config.json.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import uvicorn

    from serving.app import create_app
    from serving.config import ServingConfig

    try:
        config = ServingConfig.read(args.config)
        app = create_app(config)
    except LifecycleError as exc:
        print(f"serving: {exc}", file=sys.stderr, flush=True)
        return 2
    print(f"serving: deployment {config.deployment_id} on http://{config.host}:{config.port}", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=config.host, port=config.port, workers=None, log_level="warning", access_log=False,
                server_header=False, timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())

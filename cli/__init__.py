"""The `lifecycle` command line: the top layer, over flows, tasks, blocks and core.

`cli.app` holds the typer app and the run/inspect commands, `cli.server` the orchestration commands
(`up`, `notify`, `register`), `cli.models` the champion commands; all three share `cli.console`.
"""

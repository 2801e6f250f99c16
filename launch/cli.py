"""``munet-swarm COMMAND ...``: the launch/ scripts as one command on PATH after ``pip install``.

    munet-swarm run ...        launch/run_swarm.py   start (or resume) a swarm
    munet-swarm attach ...     launch/attach.py      one more agent for a task on a live store
    munet-swarm query ...      launch/query.py       leaderboard, show, export, report, verify, ...
    munet-swarm serve ...      launch/serve_store.py the store service for agents on other hosts
    munet-swarm make-root ...  launch/make_root.py   build the offline pretrained root ahead
    munet-swarm serve-models   launch/serve_models.py every task's model over HTTP, live

Each command is exactly its script: the same flags, output and exit codes (``munet-swarm run --help``
prints run_swarm.py's help). The scripts stay, for a checkout without an install.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from launch.common import run

COMMANDS = {  # command -> (module, the script's name in its messages)
    "run": ("launch.run_swarm", "run_swarm.py"),
    "attach": ("launch.attach", "attach.py"),
    "query": ("launch.query", "query.py"),
    "serve": ("launch.serve_store", "serve_store.py"),
    "make-root": ("launch.make_root", "make_root.py"),
    "serve-models": ("launch.serve_models", "serve_models.py"),
}
USAGE = "usage: munet-swarm {" + ",".join(COMMANDS) + "} [ARGS...]  (munet-swarm COMMAND --help)"


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip() if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"munet-swarm: error: unknown command {command!r}; choose one of "
              f"{', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, script = COMMANDS[command]
    module = importlib.import_module(module_name)
    sys.argv = [f"munet-swarm {command}", *rest]  # argparse names the command in usage and errors
    if command == "query":  # query.py's main takes argv and maps its own errors
        return module.main(rest)
    return run(module.main, script)


def entry() -> None:
    sys.exit(main())

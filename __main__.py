"""The `llmd` command: the app's commands plus the web UI's (`llmd up`, `llmd host`).

The one place that joins `app/` and `ui/`: the UI's commands import the app, never the reverse.
Run as `llmd ...` or `python -m llmd ...`.
"""

import sys

from llmd.app import cli
from llmd.ui.commands import add_up_commands


def main(argv=None) -> int:
    return cli.main(argv, extensions=[add_up_commands])


if __name__ == "__main__":
    sys.exit(main())

"""``python -m runtime.serving BUNDLE ...``: the same as ``ugsep serve``."""

from __future__ import annotations

import argparse
import logging
import sys

from runtime.errors import UgsepError
from runtime.serving import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.serving", description=__doc__)
    cli.add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return cli.run(args)
    except UgsepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

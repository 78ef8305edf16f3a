"""`dlrhub` under uvloop, without touching the server: installs uvloop's event-loop policy, then runs
the real command line (dlrhub.cli.main, whose asyncio.run then builds a uvloop loop).

    python -m bench.serve_uvloop serve --listen 127.0.0.1:0 --db data/dlrhub.db
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

from dlrhub import cli


def main() -> int:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return cli.main()


if __name__ == "__main__":
    sys.exit(main())

"""`python -m dlrhub_client`: the `dlrhub` command."""

import sys

from dlrhub_client.cli import main

sys.exit(main())

"""`python -m embdeploy ...`: the CLI, where the `embdeploy` script is not on PATH."""

import sys

from .cli import main

sys.exit(main())

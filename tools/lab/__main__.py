"""``python -m tools.lab ARGS``: the same as ``mdevd lab ARGS``."""

import sys

from tools.lab.cli import main

sys.exit(main())

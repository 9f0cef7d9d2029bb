"""``python -m mdevcore.tools.lab ARGS``: the same as ``mdevd lab ARGS``."""

import sys

from mdevcore.tools.lab.cli import main

sys.exit(main())

import sys
from pathlib import Path

# The shared test parent and the daemon runner live next to other tests.
_TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_TESTS / "core"))
sys.path.insert(0, str(_TESTS / "daemon"))

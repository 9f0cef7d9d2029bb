import sys
from pathlib import Path

# The shared test parent (mdev_testdriver) lives next to the core tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

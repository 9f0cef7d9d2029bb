import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
sys.path.insert(0, str(_HERE.parent / "virtio"))  # the test virtio-net driver (NetGuest)
sys.path.insert(0, str(_HERE.parent / "daemon"))  # the mdevd runner
sys.path.insert(0, str(_HERE.parent / "nvme"))  # migration steps by hand (mig_by_hand)

from ifcvf_card import Card, make_card  # noqa: E402


@pytest.fixture
async def card(tmp_path: Path) -> AsyncIterator[Card]:
    async with make_card(tmp_path) as c:
        yield c

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from nvme_host import NS_SIZE, FakeClock, GuestMemory, Host

from mdevcore.nvme import ControllerConfig, FileNamespace, NvmeController


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    yield m
    m.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def irqs() -> list[int]:
    return []


@pytest.fixture
def backing(tmp_path: Path) -> Path:
    return tmp_path / "ns1.img"


@pytest.fixture
def namespace(backing: Path) -> Iterator[FileNamespace]:
    ns = FileNamespace(backing, NS_SIZE)
    yield ns
    ns.close()


@pytest.fixture
def ctrl(
    mem: GuestMemory, namespace: FileNamespace, irqs: list[int], clock: FakeClock
) -> NvmeController:
    config = ControllerConfig(max_io_queues=8, max_queue_entries=256, mdts=5)
    return NvmeController(
        mem, [namespace], irqs.append, config=config, clock=clock, irq_vectors=lambda: 9
    )


@pytest.fixture
def host(ctrl: NvmeController, mem: GuestMemory) -> Host:
    h = Host(ctrl, mem)
    h.enable()
    assert ctrl.ready
    return h


@pytest.fixture
def io_host(host: Host) -> Host:
    host.create_io_queue_pair(1)
    return host

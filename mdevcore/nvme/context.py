"""What the command sets and the state loader may see of the controller.

``admin`` and ``nvm`` execute commands and ``state`` saves and restores,
all against these protocols rather than against NvmeController itself:
the controller imports them, they never import it, and each protocol
lists exactly what its users touch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from mdevcore.nvme.features import Features
from mdevcore.nvme.identify import ControllerConfig
from mdevcore.nvme.interrupts import InterruptLogic
from mdevcore.nvme.logpages import AsyncEvents, ErrorLog, SmartCounters
from mdevcore.nvme.namespace import FileNamespace
from mdevcore.nvme.prp import DmaSpace
from mdevcore.nvme.queues import CompletionQueue, SubmissionQueue
from mdevcore.nvme.shadow import ShadowDoorbells


class IoContext(Protocol):
    """What the NVM command set (read, write, flush, ...) needs."""

    config: ControllerConfig
    dma: DmaSpace
    page_size: int
    smart: SmartCounters

    @property
    def namespaces(self) -> Sequence[FileNamespace]: ...

    def require_namespace(self, nsid: int) -> FileNamespace: ...


class ControllerContext(IoContext, Protocol):
    """What the admin command set and the migration state see."""

    cc: int
    csts: int
    aqa: int
    asq: int
    acq: int
    sqs: dict[int, SubmissionQueue]
    cqs: dict[int, CompletionQueue]
    doorbells: memoryview
    shadow: ShadowDoorbells | None
    irq: InterruptLogic
    features: Features
    events: AsyncEvents
    error_log: ErrorLog
    last_keep_alive: float
    clock: Callable[[], float]
    level_irq: Callable[[], bool]

    def irq_vectors(self) -> int: ...

    def complete(self, sq: SubmissionQueue, cid: int, status: int, dw0: int = 0) -> None: ...

    def reset(self) -> None: ...

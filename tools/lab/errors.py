"""The one exception type the lab raises."""

from __future__ import annotations


class LabError(OSError):
    """A lab step failed; ``errno`` says how, ``strerror`` says why.

    Subclassing OSError keeps the project's convention (errors carry an errno)
    and lets callers catch lab failures apart from test failures.
    """

    def __init__(self, errno_value: int, why: str, *, console: str = "") -> None:
        super().__init__(errno_value, why)
        # What the guest printed before things went wrong: the first thing a
        # developer needs when a boot fails or times out.
        self.console = console

    def __str__(self) -> str:
        text = super().__str__()
        if self.console:
            tail = "\n".join(self.console.splitlines()[-25:])
            text += f"\n--- last console lines ---\n{tail}"
        return text

"""The MSI-X table and PBA as a device emulates them in its BARs.

The table (16 bytes per vector: address, data, vector control) and the
pending-bit array live in memory BARs the device declared; a BAR access
that lies wholly inside one of them is served here instead of reaching the
parent's ``bar_read``/``bar_write``.

Masking from the table is honoured only once the client has written the
table: QEMU emulates MSI-X itself and never forwards table accesses, so
with QEMU our copy keeps its power-on "all masked" state and delivery
follows SET_IRQS alone (QEMU masks in its own emulation).  A client that
programs the table through the BAR gets PCI semantics.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from mdevcore.pci import caps

_MASKED_ENTRY = bytes(12) + caps.MSIX_ENTRY_CTRL_MASKBIT.to_bytes(4, "little")


class MsixTable:
    """Table contents, ownership, and BAR-access routing of one MSI-X capability."""

    def __init__(self, layout: caps.MsixLayout) -> None:
        self.layout = layout
        self.entries = bytearray(_MASKED_ENTRY * layout.vectors)
        # Whether the client programs the table itself (see the module doc).
        self.owned = False

    def reset(self) -> None:
        """Power-on state: every vector masked, the client owns nothing yet."""
        self.entries = bytearray(_MASKED_ENTRY * self.layout.vectors)
        self.owned = False

    def _area(self, bar: int, offset: int, count: int) -> str | None:
        m = self.layout
        if (
            bar == m.table_bar
            and m.table_offset <= offset
            and offset + count <= m.table_offset + m.table_size
        ):
            return "table"
        if (
            bar == m.pba_bar
            and m.pba_offset <= offset
            and offset + count <= m.pba_offset + m.pba_size
        ):
            return "pba"
        return None

    def read(self, bar: int, offset: int, count: int, pending: Sequence[bool]) -> bytes | None:
        """The bytes of a table/PBA read, or None when the access is not ours."""
        area = self._area(bar, offset, count)
        if area is None:
            return None
        if area == "table":
            start = offset - self.layout.table_offset
            return bytes(self.entries[start : start + count])
        bits = sum(1 << i for i, p in enumerate(pending) if p)
        pba = bits.to_bytes(self.layout.pba_size, "little")
        start = offset - self.layout.pba_offset
        return pba[start : start + count]

    def write(self, bar: int, offset: int, data: bytes) -> range | None:
        """Apply a table write; returns the vectors it touched (empty for the
        read-only PBA), or None when the access is not ours."""
        area = self._area(bar, offset, len(data))
        if area is None:
            return None
        if area == "pba":
            return range(0)
        start = offset - self.layout.table_offset
        self.entries[start : start + len(data)] = data
        self.owned = True
        return range(
            start // caps.MSIX_ENTRY_SIZE, (start + len(data) - 1) // caps.MSIX_ENTRY_SIZE + 1
        )

    def masked(self, vector: int, function_mask: bool) -> bool:
        """Whether the table (or the function mask bit) holds ``vector`` back."""
        if not self.owned:
            return False
        if function_mask:
            return True
        entry = vector * caps.MSIX_ENTRY_SIZE + 12
        return bool(
            int.from_bytes(self.entries[entry : entry + 4], "little") & caps.MSIX_ENTRY_CTRL_MASKBIT
        )

    # --- migration -------------------------------------------------------------

    def snapshot(self) -> bytes:
        return bytes(self.entries)

    def restore(self, data: bytes) -> None:
        """Load a saved table (ownership stays as it is: see the module doc)."""
        if len(data) != len(self.entries):
            raise OSError(
                errno.EINVAL, f"MSI-X table is {len(self.entries)} bytes, not {len(data)}"
            )
        self.entries[:] = data

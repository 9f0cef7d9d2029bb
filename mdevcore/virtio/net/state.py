"""A virtio-net device's migration state: what moves, and how it is checked on arrival.

The stream is ``STATE_MAGIC`` + JSON:

- ``geometry``: what the driver saw of the device beyond its registers
  (queue pairs, queue size, MTU, offered features); the destination must
  be the same device or it refuses with EINVAL;
- ``transport``: VirtioPciDevice.save_transport() (features, status,
  config generation, MSI-X vectors, every queue's addresses and
  avail/used indices);
- ``net``: the host-set MAC, link state, the receive filter the driver
  programmed (its MAC, promiscuous/all-multicast, the MAC tables), the
  active queue pairs and the GUEST_* offloads it switched on (null: as
  negotiated);
- ``config`` and ``msix_table``/``msix_owned``: PCI config space and the
  MSI-X table.

Frames waiting in the RX backlog do not move: they are lost as on a wire
during the switch-over.  Nothing is applied until everything is checked.
"""

from __future__ import annotations

import dataclasses
import errno
import json
from typing import TYPE_CHECKING, Any

from mdevcore.virtio.net import offload
from mdevcore.virtio.net.control import MAX_MAC_TABLE, NetControl, RxFilter

if TYPE_CHECKING:
    from mdevcore.virtio.net.device import VirtioNetDevice

STATE_MAGIC = b"VIRTIO-NET/1\n"
MAX_STATE_BYTES = 1 << 20


def _geometry(dev: VirtioNetDevice) -> list[int]:
    n = dev.net
    return [n.max_pairs, n.queue_size, n.mtu, len(dev.queues), dev.common.device_features]


def save(dev: VirtioNetDevice) -> bytes:
    f = dev.control.filter
    assert dev.msix_table is not None  # a virtio device always has MSI-X
    blob = {
        "geometry": _geometry(dev),
        "transport": dev.save_transport(),
        "net": {
            "mac": dev.net.mac.hex(),
            "link_up": dev.link_up,
            "filter_mac": f.mac.hex(),
            "promisc": f.promisc,
            "allmulti": f.allmulti,
            "unicast": [m.hex() for m in f.unicast],
            "multicast": [m.hex() for m in f.multicast],
            "pairs": dev.control.pairs,
            "guest_offloads": dev.control.guest_offloads,
        },
        "config": dev.config.read(0, dev.config.size).hex(),
        "msix_table": dev.msix_table.snapshot().hex(),
        "msix_owned": dev.msix_table.owned,
    }
    return STATE_MAGIC + json.dumps(blob, separators=(",", ":")).encode()


def _mac(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 12:
        raise ValueError(f"MAC {value!r}")
    return bytes.fromhex(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not a boolean")
    return value


def _macs(value: Any) -> list[bytes]:
    if not isinstance(value, list) or len(value) > MAX_MAC_TABLE:
        raise ValueError("MAC table")
    return [_mac(m) for m in value]


def load(dev: VirtioNetDevice, data: bytes) -> None:
    """Check ``data`` whole, then apply it; OSError(EINVAL) for anything wrong."""
    if not data.startswith(STATE_MAGIC) or len(data) > MAX_STATE_BYTES:
        raise OSError(errno.EINVAL, "not a virtio-net state")
    assert dev.msix_table is not None
    try:
        blob = json.loads(data[len(STATE_MAGIC) :])
        if not isinstance(blob, dict) or not isinstance(blob.get("net"), dict):
            raise ValueError("not a state object")
        net = blob["net"]
        mac, filter_mac = _mac(net["mac"]), _mac(net["filter_mac"])
        link_up, promisc, allmulti = (_flag(net[k]) for k in ("link_up", "promisc", "allmulti"))
        unicast, multicast = _macs(net["unicast"]), _macs(net["multicast"])
        pairs = net["pairs"]
        if type(pairs) is not int or not 1 <= pairs <= dev.net.max_pairs:
            raise ValueError(f"queue pairs {pairs!r}")
        guest_offloads = net.get("guest_offloads")  # absent from older streams: as negotiated
        if guest_offloads is not None and (
            type(guest_offloads) is not int or guest_offloads & ~offload.GUEST_OFFLOADS
        ):
            raise ValueError(f"guest offloads {guest_offloads!r}")
        config = bytes.fromhex(blob["config"])
        msix_table = bytes.fromhex(blob["msix_table"])
        msix_owned = _flag(blob["msix_owned"])
        geometry = blob["geometry"]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        # RecursionError: JSON nested deeper than the decoder goes is bad input too.
        raise OSError(errno.EINVAL, f"virtio-net state unreadable: {exc}") from None
    if geometry != _geometry(dev):
        raise OSError(errno.EINVAL, f"virtio-net state for {geometry!r}, not {_geometry(dev)}")
    if len(config) != dev.config.size or len(msix_table) != len(dev.msix_table.snapshot()):
        raise OSError(errno.EINVAL, "virtio-net state from a different device layout")
    # Config space first: the transport checks its vectors against MSI-X.
    previous = dev.config.read(0, dev.config.size)
    dev.config.update(0, config)
    try:
        dev.load_transport(blob["transport"])  # resets the device, then restores
    except OSError:
        dev.config.update(0, previous)
        raise
    dev.net = dataclasses.replace(dev.net, mac=mac)  # not set_mac: no new config generation
    dev.control = NetControl(
        RxFilter(filter_mac, promisc, allmulti, unicast, multicast),
        dev.net.max_pairs,
        pairs,
        guest_offloads,
    )
    dev.link_up = link_up
    dev.msix_table.restore(msix_table)
    dev.msix_table.owned = msix_owned
    dev.restored = True

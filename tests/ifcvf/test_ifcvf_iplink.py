"""``ip link set PF vf N mac ... / state ...`` against the card, through mdevd's control socket."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio
from ifcvf_card import PF, PF_DIR, Card, make_card
from net_guest import CONFIG_VECTOR, RX0, NetGuest, frame

from mdevcore.daemon.control import ControlServer, handle_request
from mdevcore.daemon.devlink import DevlinkRegistry, control_path, request
from mdevcore.virtio import spec

MAC0 = "02:1f:c0:61:00:01"  # the card's default for VF 0
NEW = "52:54:00:12:34:56"
SHOW = (
    "2: ifcvf0: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 state UP mode DEFAULT\n"
    "    link/ether 02:1f:c0:61:00:00 brd ff:ff:ff:ff:ff:ff\n"
    "    vf 0     link/ether {vf0} brd ff:ff:ff:ff:ff:ff, link-state {state}\n"
    "    vf 1     link/ether 02:1f:c0:61:00:02 brd ff:ff:ff:ff:ff:ff, link-state auto\n"
)


@asynccontextmanager
async def controlled_card(tmp_path: Path) -> AsyncIterator[Card]:
    """A card with 2 VFs on ifcvf_vfio and mdevd's control server on its netdevs."""
    async with make_card(tmp_path) as card, trio.open_nursery() as nursery:
        server = ControlServer(
            control_path(card.run_dir), DevlinkRegistry(), card.servers.settle, card.netdevs
        )
        await nursery.start(server.serve)
        await card.vfs_for_vfio(2)
        yield card
        nursery.cancel_scope.cancel()


def ip(card: Card, line: str) -> dict[str, object]:
    """One request over the real control socket (blocking: call from a thread)."""
    return request(card.run_dir, {"cmd": "ip", "argv": line.split()})


async def test_syntax_output_and_refusals(tmp_path: Path) -> None:
    async with make_card(tmp_path) as card:
        assert card.ip("link show").out == SHOW.split("    vf 0")[0]  # no VFs yet
        card.tree.write(f"{PF_DIR}/sriov_numvfs", "2")
        assert card.ip("link show ifcvf0").out == SHOW.format(vf0=MAC0, state="auto")
        r = card.ip(f"link set ifcvf0 vf 0 mac {NEW} state disable")
        assert (r.rc, r.out, r.err) == (0, "", "")
        expect = SHOW.format(vf0=NEW, state="disable")
        for line in ("link show dev ifcvf0", f"l sh {PF}", "link", "link list"):
            assert card.ip(line).out == expect, line
        assert card.ip(f"link set dev {PF} vf 0 state auto").rc == 0  # by PCI address
        assert card.ip("link set ifcvf0 vf 0x1 state enable vf 1 state auto").rc == 0
        for line, err in [
            (f"link set ifcvf0 vf 2 mac {NEW}", "RTNETLINK answers: Invalid argument"),
            ("link set ifcvf0 vf 0 mac 01:00:5e:00:00:01", "RTNETLINK answers: Invalid argument"),
            ("link set ifcvf0 vf 0 mac 00:00:00:00:00:00", "RTNETLINK answers: Invalid argument"),
            ("link set ifcvf0 vf 0 mac 52:54:00:12:34", '"52:54:00:12:34" is invalid lladdr.'),
            (
                "link set ifcvf0 vf 0 mac zz:54:00:12:34:56",
                '"zz:54:00:12:34:56" is invalid lladdr.',
            ),
            (
                "link set ifcvf0 vf 0 state sleepy",
                'Error: argument "sleepy" is wrong: Invalid "state" value',
            ),
            ("link set ifcvf0 vf x state auto", 'Error: argument "x" is wrong: Invalid "vf" value'),
            (
                "link set ifcvf0 vf 1_0 state auto",
                'Error: argument "1_0" is wrong: Invalid "vf" value',
            ),
            (
                "link set ifcvf0 vf -1 state auto",
                'Error: argument "-1" is wrong: Invalid "vf" value',
            ),
            ("link set ifcvf0 vf 0 mac", 'Command line is not complete. Try option "help"'),
            ("link set ifcvf0 vf", 'Command line is not complete. Try option "help"'),
            ("link set vf 0 state auto", 'Not enough of information: "dev" argument is required.'),
            ("link set eth9 vf 0 state auto", 'Cannot find device "eth9"'),
            (
                "link set ifcvf0 vf 0 colour blue",
                'Error: either "dev" is duplicate, or "colour" is a garbage.',
            ),
            ("link show eth9", 'Device "eth9" does not exist.'),
            ("link frob", 'Command "frob" is unknown, try "ip link help".'),
            ("addr show", 'Object "addr" is unknown, try "ip help".'),
        ]:
            r = card.ip(line)
            assert (r.rc, r.out, r.err) == (1, "", err + "\n"), line
        assert card.ip("link show ifcvf0").out == SHOW.format(vf0=NEW, state="auto")
        # the VF table lasts until SR-IOV is disabled
        card.tree.write(f"{PF_DIR}/sriov_numvfs", "0")
        card.tree.write(f"{PF_DIR}/sriov_numvfs", "2")
        assert card.ip("link show ifcvf0").out == SHOW.format(vf0=MAC0, state="auto")
        # control requests are checked before they reach ip
        for bad in (b'{"cmd": ["ip"]}', b'{"cmd": "ip", "argv": "link"}', b'{"cmd": "ip"}'):
            reply = handle_request(DevlinkRegistry(), bad, card.netdevs)
            assert reply["rc"] == 1 and str(reply["err"]).startswith("mdevd:"), bad
        assert handle_request(DevlinkRegistry(), b'{"cmd": "ip", "argv": []}')["rc"] == 1


async def test_a_live_vf_hears_mac_and_link_changes(tmp_path: Path) -> None:
    new = bytes.fromhex(NEW.replace(":", ""))
    old = bytes.fromhex(MAC0.replace(":", ""))
    peer = bytes.fromhex("021fc0610002")
    async with controlled_card(tmp_path) as card:
        socks = [str(card.run_dir / f"0000:61:00.{n}.sock") for n in (1, 2)]

        def session() -> dict[str, object]:
            a, b = NetGuest(socks[0]), NetGuest(socks[1])
            r: dict[str, object] = {}
            try:
                for g in (a, b):
                    g.bring_up()
                    g.post_rx(RX0, 8, 2048)
                r["promisc_off"] = a.ctrl(spec.NET_CTRL_RX, spec.NET_CTRL_RX_PROMISC, b"\0")
                gen = a.drv.read(spec.COMMON_CFGGENERATION, 1)
                r["set"] = ip(card, f"link set ifcvf0 vf 0 mac {NEW}")
                r["irq"] = a.wait(CONFIG_VECTOR, 5.0)
                r["gen_moved"] = a.drv.read(spec.COMMON_CFGGENERATION, 1) != gen
                r["mac"] = a.mac()
                # the RX filter follows: the old MAC is no longer ours
                b.send(frame(old, peer, b"to the old MAC"))
                b.send(frame(new, peer, b"to the new MAC"))
                r["got"] = a.receive(RX0, 1)
                r["down"] = ip(card, "link set ifcvf0 vf 0 state disable")
                r["irq_down"] = a.wait(CONFIG_VECTOR, 5.0)
                r["status_down"] = a.net_status()
                a.send(frame(peer, new, b"while down"))
                r["reaped_down"] = a.reap_tx()
                r["enable"] = ip(card, "link set ifcvf0 vf 0 state enable")
                r["irq_up"] = a.wait(CONFIG_VECTOR, 5.0)
                r["status_up"] = a.net_status()
                a.bring_up()  # a device reset keeps what the host set
                r["mac_after_reset"] = a.mac()
                r["show"] = ip(card, "link show ifcvf0")
            finally:
                a.close()
                b.close()
            return r

        with trio.fail_after(30):
            r = await trio.to_thread.run_sync(session)
        ok = {"rc": 0, "out": "", "err": ""}
        assert (r["promisc_off"], r["set"], r["down"], r["enable"]) == (spec.NET_OK, ok, ok, ok)
        assert (r["irq"], r["gen_moved"], r["mac"]) == (True, True, new)
        assert r["got"] == [(frame(new, peer, b"to the new MAC"), 1)]
        assert (r["irq_down"], r["status_down"], r["reaped_down"]) == (True, 0, 1)
        assert (r["irq_up"], r["status_up"]) == (True, spec.NET_S_LINK_UP)
        assert r["mac_after_reset"] == new
        show = r["show"]
        assert isinstance(show, dict)
        assert f"vf 0     link/ether {NEW} brd ff:ff:ff:ff:ff:ff, link-state enable" in str(
            show["out"]
        )
        pf = card.host.pf
        assert pf is not None and pf.sriov is not None
        assert pf.sriov.vfs[0].device.backend.stats.tx_frames == 0  # type: ignore[attr-defined]

        # and the mdevd ip command line, as an operator types it
        proc = await trio.run_process(
            [sys.executable, "-m", "mdevcore.daemon.cli", "ip", "--run-dir", str(card.run_dir)]
            + "link set ifcvf0 vf 1 state disable".split(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"", b"")
        assert not pf.sriov.vfs[1].device.link_up  # type: ignore[attr-defined]
        proc = await trio.run_process(
            [sys.executable, "-m", "mdevcore.daemon.cli", "ip", "--run-dir", str(card.run_dir)]
            + "link set ifcvf0 vf 7 state disable".split(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert (proc.returncode, proc.stderr) == (1, b"RTNETLINK answers: Invalid argument\n")


def test_mdevd_ip_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mdevcore.daemon.cli import main

    assert main(["ip", "--run-dir", str(tmp_path), "link", "show"]) == 1
    assert "mdevd ip: cannot reach mdevd" in capsys.readouterr().err

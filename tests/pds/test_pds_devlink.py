"""devlink dev param set/show: iproute2's syntax, output and errors, and the control protocol."""

from __future__ import annotations

import json

import pytest
from pds_card import PF, Card

from mdevcore.daemon.control import handle_request
from mdevcore.daemon.devlink import BoolParam

SET = f"dev param set pci/{PF} name enable_lm"
SHOW_TRUE = (
    f"pci/{PF}:\n"
    "  name enable_lm type driver-specific\n"
    "    values:\n"
    "      cmode runtime value true\n"
)


async def test_set_and_show(card: Card) -> None:
    assert card.devlink_cmd(f"dev param show pci/{PF} name enable_lm").out == SHOW_TRUE.replace(
        "true", "false"
    )
    r = card.devlink_cmd(f"{SET} value true cmode runtime")
    assert (r.rc, r.out, r.err) == (0, "", "")
    for line in (
        "dev param show",
        f"dev param show pci/{PF}",
        f"dev param show pci/{PF} name enable_lm",
    ):
        assert card.devlink_cmd(line).out == SHOW_TRUE, line
    # iproute2's prefixes and the unchanged-value no-op
    assert card.devlink_cmd(f"d p s pci/{PF} name enable_lm").out == SHOW_TRUE
    assert card.devlink_cmd(f"{SET} value enable cmode runtime").rc == 0
    assert card.devlink_cmd(f"{SET} value 0 cmode runtime").rc == 0
    assert "value false" in card.devlink_cmd("dev param show").out


@pytest.mark.parametrize(
    ("line", "err"),
    [
        (
            f"dev param set pci/{PF} name bogus value true cmode runtime",
            "kernel answers: Invalid argument",
        ),
        (
            "dev param set pci/0000:61:00.0 name enable_lm value true cmode runtime",
            "kernel answers: No such device",
        ),
        (f"{SET} value maybe cmode runtime", 'Value "maybe" is not a number or not within range'),
        (f"{SET} value true cmode sometimes", 'Unknown configuration mode "sometimes"'),
        (f"{SET} value true cmode driverinit", "Configuration mode not supported"),
        (f"{SET} value true", "Configuration mode expected."),
        (f"dev param set pci/{PF} value true cmode runtime", "Parameter name expected."),
        (f"{SET} cmode runtime", "Value to set expected."),
        (f"{SET} value true cmode runtime colour blue", 'Unknown option "colour"'),
        (
            "dev param set 0000:60:00.0 name enable_lm",
            "Wrong devlink identification string format.",
        ),
        ("dev param show pci/0000:61:00.0 name enable_lm", "kernel answers: No such device"),
        ("dev param frob", 'Command "frob" not found'),
        ("port show", 'Object "port" not found'),
        ("dev info", 'Command "info" not found'),
    ],
)
async def test_errors(card: Card, line: str, err: str) -> None:
    r = card.devlink_cmd(line)
    assert r.rc == 1
    assert r.err.splitlines()[0] == err
    assert r.out == ""
    assert "value false" in card.devlink_cmd("dev param show").out  # nothing changed


async def test_control_requests_are_checked(card: Card) -> None:
    ok = handle_request(
        card.devlink, json.dumps({"cmd": "devlink", "argv": ["dev", "param"]}).encode()
    )
    assert ok["rc"] == 0 and "enable_lm" in ok["out"]
    too_deep = b"[" * 100_000  # beyond the JSON decoder's recursion limit
    for bad in (
        b"{",
        b"[]",
        b'{"cmd": "reboot"}',
        b'{"cmd": "devlink", "argv": [1]}',
        b"\xff",
        too_deep,
    ):
        reply = handle_request(card.devlink, bad)
        assert reply["rc"] == 1 and reply["err"].startswith("mdevd:"), bad


async def test_a_crashing_parameter_gets_an_error_reply(card: Card) -> None:
    def broken(on: bool) -> None:
        raise RuntimeError("driver bug")

    card.devlink.register("pci/0000:99:00.0", [BoolParam("flaky", lambda: False, broken)])
    argv = ["dev", "param", "set", "pci/0000:99:00.0", "name", "flaky", "value", "true"]
    reply = handle_request(
        card.devlink, json.dumps({"cmd": "devlink", "argv": argv + ["cmode", "runtime"]}).encode()
    )
    assert reply["rc"] == 1 and reply["err"].startswith("mdevd:")

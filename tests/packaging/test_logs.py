"""mdevd's log formats: JSON lines with device, client, event and errno; text
with sd-daemon priorities when stderr is the journal."""

from __future__ import annotations

import io
import json
import logging
import os
import uuid
from pathlib import Path

import pytest
from mdevd_run import Serving

from mdevcore.daemon import logs
from mdevcore.tools.vfio_user_cli import main as vfio_user_cli
from mdevcore.vfio_user.stats import DeviceStats


def _logger(stream: io.StringIO | io.TextIOWrapper, fmt: str, env: dict[str, str]) -> None:
    logs.configure(fmt, "debug", stream=stream, env=env)


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_fields_a_record_knows() -> None:
    stream = io.StringIO()
    _logger(stream, "json", {})
    stats = DeviceStats("dev0", logger=logging.getLogger("mdevcore.vfio_user"))
    stats.error("EINVAL REGION_READ", "%s: msg %#x cmd %d failed", "dev0#3", 7, 2)
    logging.getLogger("mdevd").warning("plain, with\na newline")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["time"].endswith("Z") and first["level"] == "info"
    assert first == first | {
        "logger": "mdevcore.vfio_user",
        "message": "dev0#3: msg 0x7 cmd 2 failed",
        "device": "dev0",
        "client": 3,
        "event": "EINVAL REGION_READ",
        "errno": "EINVAL",
    }
    assert second["message"] == "plain, with\na newline" and second["level"] == "warning"
    assert not {"device", "client", "event", "errno"} & set(second)


def test_under_the_journal_lines_start_with_the_priority(tmp_path: Path) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        assert logs.under_journal(env, stream)
        assert not logs.under_journal({"JOURNAL_STREAM": f"{st.st_dev}:1"}, stream)
        _logger(stream, "text", env)
        log = logging.getLogger("mdevd")
        log.info("ready")
        log.error("failed:\ndetail")
        log.debug("chatter")
        _logger(stream, "json", env)
        log.warning("as json")
        stream.seek(0)
        lines = stream.read().splitlines()
    # No timestamp (the journal has its own); a second line stays in the entry.
    assert lines[:4] == ["<6>mdevd: ready", "<3>mdevd: failed:", " detail", "<7>mdevd: chatter"]
    assert lines[4].startswith("<4>{") and json.loads(lines[4][3:])["message"] == "as json"


def test_mdevd_serve_logs_json_lines_with_device_and_client(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sysfs, run_dir = tmp_path / "sys", tmp_path / "run"
    daemon = Serving(
        tmp_path / "log", "--no-config", "--no-pds", "--no-parent", "ifcvf",
        "--sysfs", sysfs, "--run-dir", run_dir, "--log-format", "json",
    )  # fmt: skip
    try:
        dev = uuid.uuid4()
        types = sysfs / "devices/virtual/mtty/mtty/mdev_supported_types"
        (types / "mtty-1" / "create").write_text(f"{dev}\n")
        socket = str(run_dir / f"{dev}.sock")
        assert vfio_user_cli([socket, "read", "0", "0x100000", "4"]) == 1  # past BAR0
        assert capsys.readouterr().err == (
            f"vfio-user-cli: error: read 4 bytes of region 0 at 0x100000 on {socket}: "
            "REGION_READ: Invalid argument (EINVAL)\n"
        )
    finally:
        assert daemon.stop() == 0
    records = [json.loads(line) for line in daemon.log_path.read_text().splitlines()]
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)
    mine = [r for r in records if r.get("device") == str(dev)]
    events = {r.get("event") for r in mine}
    assert {"connect", "EINVAL REGION_READ", "gone"} <= events, mine
    refused = next(r for r in mine if r.get("event") == "EINVAL REGION_READ")
    assert refused["errno"] == "EINVAL" and refused["client"] == 1

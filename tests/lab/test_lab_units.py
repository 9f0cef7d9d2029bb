"""The lab's pure parts: apt sources, cpio format, chroot paths, QEMU argv."""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path, PurePosixPath

import pytest

from mdevcore.tools.lab import aptsources, initramfs, qemu
from mdevcore.tools.lab.cli import main
from mdevcore.tools.lab.cpio import CpioArchive
from mdevcore.tools.lab.errors import LabError
from mdevcore.tools.lab.namespace import Binds, namespace_argv
from mdevcore.tools.lab.rootpath import resolve_in_root

# -- apt sources -------------------------------------------------------------

DEB822 = """\
Types: deb
# a comment inside the paragraph
URIs: http://archive.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://archive.example/debian-security
Suites: bookworm-security
Components: main
"""


def test_deb822_release_suites_only() -> None:
    assert list(aptsources.mirrors_from_deb822(DEB822)) == ["http://archive.example/debian"]


def test_deb822_disabled_and_source_paragraphs_ignored() -> None:
    text = (
        "Types: deb-src\nURIs: http://a.example/debian\nSuites: bookworm\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://b.example/debian\nSuites: bookworm\n"
    )
    assert list(aptsources.mirrors_from_deb822(text)) == []


def test_one_line_format_with_options() -> None:
    text = (
        "# deb http://commented.example/debian bookworm main\n"
        "deb http://sec.example/debian-security bookworm-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main\n"
    )
    assert list(aptsources.mirrors_from_list(text)) == ["http://m.example/debian"]


def test_find_mirror_reads_the_machine_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(aptsources.MIRROR_ENV, raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(DEB822)
    assert aptsources.find_mirror(tmp_path) == "http://archive.example/debian"
    monkeypatch.setenv(aptsources.MIRROR_ENV, "http://override.example/debian/")
    assert aptsources.find_mirror(tmp_path) == "http://override.example/debian"


def test_find_mirror_without_sources_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(aptsources.MIRROR_ENV, raising=False)
    with pytest.raises(LabError) as caught:
        aptsources.find_mirror(tmp_path)
    assert caught.value.errno == errno.ENOENT
    assert aptsources.MIRROR_ENV in str(caught.value)


# -- cpio --------------------------------------------------------------------


def parse_newc(data: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """An independent reader: (name, mode, data, rdev) per entry."""
    out: list[tuple[str, int, bytes, tuple[int, int]]] = []
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110 : pos + 110 + namesize - 1].decode()
        assert data[pos + 110 + namesize - 1] == 0
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos : pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            assert pos == len(data)
            return out
        out.append((name, fields[1], body, (fields[9], fields[10])))


def test_cpio_round_trip_with_parents_and_special_files() -> None:
    archive = CpioArchive()
    archive.add_file("usr/bin/tool", b"abc", 0o755)
    archive.add_symlink("bin", "usr/bin")
    archive.add_char_device("dev/console", 5, 1)
    archive.add_file("/etc/odd-size", b"12345")
    entries = {
        name: (mode, body, rdev) for name, mode, body, rdev in parse_newc(archive.to_bytes())
    }
    assert entries["usr"][0] == stat.S_IFDIR | 0o755
    assert entries["usr/bin/tool"] == (stat.S_IFREG | 0o755, b"abc", (0, 0))
    assert entries["bin"] == (stat.S_IFLNK | 0o777, b"usr/bin", (0, 0))
    assert entries["dev/console"] == (stat.S_IFCHR | 0o600, b"", (5, 1))
    assert entries["etc/odd-size"][1] == b"12345"
    names = [name for name, *_ in parse_newc(archive.to_bytes())]
    assert names.index("usr") < names.index("usr/bin") < names.index("usr/bin/tool")


def test_cpio_later_entry_wins_and_bad_paths_refused() -> None:
    archive = CpioArchive()
    archive.add_symlink("usr/bin/lspci", "/usr/bin/busybox")
    archive.add_file("usr/bin/lspci", b"real")
    assert archive.entry("usr/bin/lspci").data == b"real"
    for bad in ("", "/", "a/../../etc"):
        with pytest.raises(ValueError):
            archive.add_file(bad, b"")


def test_cpio_write_reports_size() -> None:
    archive = CpioArchive()
    archive.add_file("x", b"1")
    buf = io.BytesIO()
    assert archive.write(buf) == len(buf.getvalue())
    assert len(buf.getvalue()) % 4 == 0


# -- chroot paths --------------------------------------------------------------


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/libx.so.1.2").write_bytes(b"ELF")
    os.symlink("libx.so.1.2", root / "usr/lib/x86_64-linux-gnu/libx.so.1")
    os.symlink("usr/lib", root / "lib")
    (root / "run").mkdir()
    (root / "var").mkdir()
    os.symlink("/run", root / "var/run")  # absolute: must stay inside root
    os.symlink("loop2", root / "loop1")
    os.symlink("loop1", root / "loop2")
    return root


def test_resolve_follows_relative_and_absolute_links_inside_root(fake_root: Path) -> None:
    got = resolve_in_root(fake_root, "/lib/x86_64-linux-gnu/libx.so.1")
    assert got.path == PurePosixPath("/usr/lib/x86_64-linux-gnu/libx.so.1.2")
    assert [str(link) for link, _ in got.links] == [
        "/lib",
        "/usr/lib/x86_64-linux-gnu/libx.so.1",
    ]
    assert resolve_in_root(fake_root, "/var/run/mdevd", must_exist=False).path == PurePosixPath(
        "/run/mdevd"
    )


def test_resolve_errors(fake_root: Path) -> None:
    with pytest.raises(LabError) as loop:
        resolve_in_root(fake_root, "/loop1/x")
    assert loop.value.errno == errno.ELOOP
    with pytest.raises(LabError) as missing:
        resolve_in_root(fake_root, "/nope/x")
    assert missing.value.errno == errno.ENOENT


def test_binds_make_missing_mount_points_in_a_private_tmpfs(
    fake_root: Path, tmp_path: Path
) -> None:
    host_dir = tmp_path / "sockets"
    host_dir.mkdir()
    binds = Binds.plan(fake_root, [str(host_dir), "/dev", str(host_dir)])
    inside = fake_root / str(host_dir).lstrip("/")
    assert binds.pairs == [(host_dir, inside)]  # /dev skipped, duplicate dropped
    top = fake_root / host_dir.parts[1]
    assert binds.tmpfs == [top]
    # Nothing below the top directory is made on disk: the namespace does it.
    assert top.is_dir() and list(top.iterdir()) == []
    ops = binds.operations()
    assert ops == ["tmpfs", str(top), "bind", str(host_dir), str(inside)]
    argv = namespace_argv(fake_root, ["qemu"], binds)
    assert argv[argv.index(str(fake_root)) + 1 :] == [*ops, "--", "qemu"]


def test_binds_follow_chroot_symlinks_and_existing_dirs(fake_root: Path, tmp_path: Path) -> None:
    binds = Binds.plan(fake_root, ["/var/run"])
    assert binds.pairs == [(Path("/var/run"), fake_root / "run")]
    assert binds.tmpfs == []  # /run exists in the root: a plain bind
    binds.add(tmp_path, at=PurePosixPath("/usr/lib/extra"))
    assert (fake_root / "usr/lib/extra").is_dir()  # below system dirs: made on disk
    assert binds.tmpfs == []
    with pytest.raises(LabError):
        Binds.plan(fake_root, ["relative/dir"])
    with pytest.raises(LabError):
        Binds.plan(fake_root, ["/"])
    with pytest.raises(LabError):
        Binds.plan(fake_root, [str(tmp_path / "missing")])


# -- guest pieces --------------------------------------------------------------

MODULES_DEP = """\
kernel/drivers/nvme/host/nvme-core.ko.xz: kernel/drivers/nvme/common/nvme-auth.ko.xz
kernel/drivers/nvme/common/nvme-auth.ko.xz:
kernel/drivers/nvme/host/nvme.ko.xz: kernel/drivers/nvme/host/nvme-core.ko.xz \
kernel/drivers/nvme/common/nvme-auth.ko.xz
kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz
"""


def test_module_closure_orders_dependencies_first() -> None:
    got = initramfs.module_closure(MODULES_DEP, ["nvme"])
    assert got == [
        "kernel/drivers/nvme/common/nvme-auth.ko.xz",
        "kernel/drivers/nvme/host/nvme-core.ko.xz",
        "kernel/drivers/nvme/host/nvme.ko.xz",
    ]
    assert initramfs.module_closure(MODULES_DEP, ["nvme_core"])[-1].endswith("nvme-core.ko.xz")
    with pytest.raises(LabError):
        initramfs.module_closure(MODULES_DEP, ["vfio_pci"])


def test_loader_list_parsing() -> None:
    text = (
        "\tlinux-vdso.so.1 (0x00007ffd)\n"
        "\tlibpci.so.3 => /lib/x86_64-linux-gnu/libpci.so.3 (0x00007f16)\n"
        "\t/lib64/ld-linux-x86-64.so.2 (0x00007f17)\n"
    )
    assert initramfs.parse_loader_list(text) == [
        PurePosixPath("/lib/x86_64-linux-gnu/libpci.so.3"),
        PurePosixPath("/lib64/ld-linux-x86-64.so.2"),
    ]
    with pytest.raises(LabError):
        initramfs.parse_loader_list("\tlibgone.so.1 => not found\n")


def test_boot_archive_carries_script_and_token() -> None:
    entries = {
        n: b for n, _, b, _ in parse_newc(initramfs.build_boot("exit 3\n", "t0k").to_bytes())
    }
    assert entries["lab/script"] == b"exit 3\n"
    assert entries["lab/env"] == b"LAB_TOKEN=t0k\nLAB_DMESG=on-failure\nLAB_PRINTK=1\n"
    with pytest.raises(ValueError):
        initramfs.build_boot("", "t", dmesg="sometimes")


def test_boot_archive_extra_files() -> None:
    archive = initramfs.build_boot("", "t", files={"/opt/t/data.bin": b"\x00\x01", "/x.sh": "a"})
    entries = {n: (m, b) for n, m, b, _ in parse_newc(archive.to_bytes())}
    assert entries["opt/t/data.bin"] == (stat.S_IFREG | 0o755, b"\x00\x01")
    assert entries["x.sh"][1] == b"a"
    for bad in ("relative", "/init", "/lab"):
        with pytest.raises(ValueError):
            initramfs.build_boot("", "t", files={bad: b""})


# -- QEMU command line ---------------------------------------------------------


def test_device_socket_paths() -> None:
    line = '{"driver":"vfio-user-pci","socket":{"path":"/run/mdevd/a.sock","type":"unix"}}'
    assert qemu.socket_paths(line) == ["/run/mdevd/a.sock"]
    assert qemu.socket_paths("vfio-user-pci,socket.path=/x/y.sock,socket.type=unix") == [
        "/x/y.sock"
    ]
    assert qemu.socket_paths("nvme,drive=d0,serial=x") == []
    with pytest.raises(LabError):
        qemu.socket_paths('{"driver": ')


def test_file_paths_in_raw_args() -> None:
    args = ["-drive", "file=/data/disk.img,if=none,id=d0,format=raw", "-device", "nvme,drive=d0"]
    assert qemu.file_paths(args) == ["/data/disk.img"]


def test_argv_has_shared_memfd_ram_and_no_defaults() -> None:
    cfg = qemu.QemuConfig(
        kernel="/boot/vmlinuz",
        initrd="/tmp/i",
        accel="tcg",
        memory_mb=256,
        devices=["nvme,drive=d0"],
        qemu_args=["-S"],
    )
    argv = cfg.argv()
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in argv
    assert "q35,accel=tcg,memory-backend=mem" in argv
    for flag in ("-nodefaults", "-no-reboot"):
        assert flag in argv
    assert argv[argv.index("-display") + 1] == "none"
    assert argv[-3:] == ["-device", "nvme,drive=d0", "-S"]
    with pytest.raises(LabError):
        qemu.QemuConfig(kernel="k", initrd="i", accel="tcg", memory_mb=8).argv()


def test_choose_accel() -> None:
    assert qemu.choose_accel("kvm") == ("kvm", "requested")
    with pytest.raises(LabError):
        qemu.choose_accel("hvf")
    accel, why = qemu.choose_accel()
    if os.path.isdir("/sys/module/kvm_pvm") or not os.path.exists("/dev/kvm"):
        assert accel == "tcg", why


def test_cli_rejects_missing_script(capsys) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["boot"])
    assert caught.value.code == 2

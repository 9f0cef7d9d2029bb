"""An in-memory sysfs-like tree: directories, attributes and symlinks.

The tree is the whole filesystem; FUSE (``mdevcore.sysfs.fuse``) is only a
transport onto it.  Python callers (tests, tools) use the same tree
unmounted through :meth:`SysfsTree.read`, :meth:`SysfsTree.write`,
:meth:`SysfsTree.listdir` and :meth:`SysfsTree.readlink`, which walk paths
and relative symlinks the way the kernel does.

Every node gets an inode number that is never reused, so a handle on a
node that was removed fails cleanly instead of reaching a newcomer.
"""

from __future__ import annotations

import errno
import stat
import threading
from collections.abc import Callable

PAGE_SIZE = 4096  # sysfs attributes show and store at most one page
MAX_SYMLINKS = 40  # as the kernel's path walk (ELOOP beyond)

Show = Callable[[], str | bytes]
Store = Callable[[bytes], None]


class Node:
    __slots__ = ("ino", "name", "parent", "alive", "volatile")

    def __init__(self, ino: int, name: str, parent: Dir | None, volatile: bool) -> None:
        self.ino = ino
        self.name = name
        self.parent = parent
        self.alive = True
        # A volatile node may vanish at any write: the kernel must not cache it.
        self.volatile = volatile

    @property
    def mode(self) -> int:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return 0


class Dir(Node):
    __slots__ = ("children", "keep")

    def __init__(self, ino: int, name: str, parent: Dir | None, volatile: bool) -> None:
        super().__init__(ino, name, parent, volatile)
        self.children: dict[str, Node] = {}
        self.keep = False  # skeleton directories survive pruning

    @property
    def mode(self) -> int:
        return stat.S_IFDIR | 0o755


class Attr(Node):
    """A sysfs attribute: ``show`` renders it, ``store`` consumes one write."""

    __slots__ = ("show", "store", "perm")

    def __init__(
        self,
        ino: int,
        name: str,
        parent: Dir,
        volatile: bool,
        show: Show | None,
        store: Store | None,
        perm: int,
    ) -> None:
        super().__init__(ino, name, parent, volatile)
        self.show = show
        self.store = store
        self.perm = perm

    @property
    def mode(self) -> int:
        return stat.S_IFREG | self.perm

    @property
    def size(self) -> int:
        return PAGE_SIZE

    def render(self) -> bytes:
        if self.show is None:
            raise OSError(errno.EACCES, f"{self.name} is write-only")
        out = self.show()
        data = out.encode() if isinstance(out, str) else out
        return data[:PAGE_SIZE]

    def write(self, data: bytes) -> int:
        """One write(2): the store sees at most a page, like sysfs."""
        if self.store is None:
            raise OSError(errno.EACCES, f"{self.name} is read-only")
        if not self.alive:
            raise OSError(errno.ENODEV, f"{self.name} is gone")
        chunk = bytes(data[:PAGE_SIZE])
        self.store(chunk)
        return len(chunk)


class Link(Node):
    __slots__ = ("target",)

    def __init__(self, ino: int, name: str, parent: Dir, volatile: bool, target: str) -> None:
        super().__init__(ino, name, parent, volatile)
        self.target = target

    @property
    def mode(self) -> int:
        return stat.S_IFLNK | 0o777

    @property
    def size(self) -> int:
        return len(self.target.encode())


ROOT_INO = 1


class SysfsTree:
    """The node table plus path operations over it (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._next_ino = ROOT_INO + 1
        self.root = Dir(ROOT_INO, "", None, volatile=False)
        self.root.keep = True
        self._nodes: dict[int, Node] = {ROOT_INO: self.root}
        # Called with (directory, node) when a non-volatile node is detached,
        # so a transport that let the kernel cache it can invalidate it.
        self.on_detach: Callable[[Dir, Node], None] | None = None

    # --- building ---------------------------------------------------------

    def _ino(self) -> int:
        ino = self._next_ino
        self._next_ino += 1
        return ino

    def _attach(self, parent: Dir, node: Node) -> None:
        if node.name in parent.children or not node.name or "/" in node.name:
            raise OSError(errno.EEXIST, f"{self.path_of(parent)}/{node.name} exists")
        parent.children[node.name] = node
        self._nodes[node.ino] = node

    def mkdir(self, path: str, *, volatile: bool = False, keep: bool = False) -> Dir:
        """Create ``path`` and missing ancestors (mkdir -p); return the last."""
        with self.lock:
            cur = self.root
            for part in _split(path):
                child = cur.children.get(part)
                if child is None:
                    child = Dir(self._ino(), part, cur, volatile)
                    self._attach(cur, child)
                if not isinstance(child, Dir):
                    raise OSError(errno.ENOTDIR, f"{part} is not a directory")
                cur = child
            cur.keep = cur.keep or keep
            return cur

    def add_dir(self, parent: Dir, name: str, *, volatile: bool = False) -> Dir:
        """A new directory ``name`` in ``parent`` (EEXIST if the name is taken)."""
        with self.lock:
            node = Dir(self._ino(), name, parent, volatile)
            self._attach(parent, node)
            return node

    def add_attr(
        self,
        parent: Dir,
        name: str,
        show: Show | None = None,
        store: Store | None = None,
        *,
        perm: int | None = None,
        volatile: bool = False,
    ) -> Attr:
        """Add an attribute; default mode 0444, 0200 write-only, 0644 both."""
        if perm is None:
            perm = (0o444 if show else 0) | (0o200 if store else 0)
            perm = 0o644 if perm == 0o644 else perm
        with self.lock:
            node = Attr(self._ino(), name, parent, volatile, show, store, perm)
            self._attach(parent, node)
            return node

    def add_link(self, parent: Dir, name: str, target: str, *, volatile: bool = False) -> Link:
        with self.lock:
            node = Link(self._ino(), name, parent, volatile, target)
            self._attach(parent, node)
            return node

    def remove(self, node: Node) -> None:
        """Detach ``node`` (and its subtree); its inodes become ENOENT."""
        with self.lock:
            if node.parent is None:
                raise OSError(errno.EBUSY, "cannot remove the root")
            if node.parent.children.get(node.name) is node:
                del node.parent.children[node.name]
                if not node.volatile and self.on_detach is not None:
                    self.on_detach(node.parent, node)
            stack = [node]
            while stack:
                cur = stack.pop()
                cur.alive = False
                self._nodes.pop(cur.ino, None)
                if isinstance(cur, Dir):
                    stack.extend(cur.children.values())

    def prune(self, directory: Dir) -> None:
        """Remove ``directory`` and empty ancestors up to a kept one."""
        with self.lock:
            cur: Dir | None = directory
            while cur is not None and not cur.keep and not cur.children and cur.alive:
                parent = cur.parent
                self.remove(cur)
                cur = parent

    # --- lookup -----------------------------------------------------------

    def node(self, ino: int) -> Node:
        with self.lock:
            try:
                return self._nodes[ino]
            except KeyError:
                raise OSError(errno.ENOENT, f"inode {ino} is gone") from None

    def child(self, directory: Dir, name: str) -> Node:
        with self.lock:
            node = directory.children.get(name)
            if node is None:
                raise OSError(errno.ENOENT, f"no {name!r} in /{self.path_of(directory)}")
            return node

    def path_of(self, node: Node) -> str:
        parts: list[str] = []
        cur: Node | None = node
        while cur is not None and cur.parent is not None:
            parts.append(cur.name)
            cur = cur.parent
        return "/".join(reversed(parts))

    def lookup(self, path: str, *, follow: bool = True) -> Node:
        """Resolve ``path`` (relative to the root) like the kernel's walk.

        Intermediate symlinks are always followed; the last one only if
        ``follow``.  Targets are relative to the link's directory; ``..``
        at the root stays at the root.
        """
        with self.lock:
            return self._walk(self.root, _split(path), follow, [0])

    def _walk(self, start: Dir, parts: list[str], follow: bool, hops: list[int]) -> Node:
        cur: Node = start
        for i, part in enumerate(parts):
            if not isinstance(cur, Dir):
                raise OSError(errno.ENOTDIR, f"{cur.name} is not a directory")
            if part == ".":
                continue
            if part == "..":
                cur = cur.parent or cur
                continue
            nxt = self.child(cur, part)
            last = i == len(parts) - 1
            if isinstance(nxt, Link) and (follow or not last):
                hops[0] += 1
                if hops[0] > MAX_SYMLINKS:
                    raise OSError(errno.ELOOP, "too many levels of symbolic links")
                base = self.root if nxt.target.startswith("/") else cur
                nxt = self._walk(base, _split(nxt.target), True, hops)
            cur = nxt
        return cur

    def directory(self, path: str) -> Dir:
        node = self.lookup(path)
        if not isinstance(node, Dir):
            raise OSError(errno.ENOTDIR, f"{path} is not a directory")
        return node

    def realpath(self, path: str) -> str:
        return self.path_of(self.lookup(path))

    # --- file operations (unmounted use) -----------------------------------

    def read(self, path: str) -> str:
        node = self.lookup(path)
        if isinstance(node, Dir):
            raise OSError(errno.EISDIR, path)
        assert isinstance(node, Attr)
        return node.render().decode()

    def write(self, path: str, data: str | bytes) -> int:
        node = self.lookup(path)
        if isinstance(node, Dir):
            raise OSError(errno.EISDIR, path)
        assert isinstance(node, Attr)
        return node.write(data.encode() if isinstance(data, str) else data)

    def listdir(self, path: str = "") -> list[str]:
        node = self.lookup(path)
        if not isinstance(node, Dir):
            raise OSError(errno.ENOTDIR, path)
        with self.lock:
            return list(node.children)

    def readlink(self, path: str) -> str:
        node = self.lookup(path, follow=False)
        if not isinstance(node, Link):
            raise OSError(errno.EINVAL, f"{path} is not a symlink")
        return node.target

    def exists(self, path: str) -> bool:
        try:
            self.lookup(path)
        except OSError:
            return False
        return True


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]

"""cffi (API mode) declarations of libvfio-user's public API, and the loader.

API mode: ``libvfio_user_build`` compiles these declarations against the
installed header (``<prefix>/include/vfio-user/libvfio-user.h``) into the
extension module ``_mdevcore_libvfio_user``, linked to
``<prefix>/lib/libvfio-user.so.0``; ``setup.sh`` does it after building the
library.  The compiler checks every declaration, struct layout (``...``:
the header's own) and constant below against the header, so a libvfio-user
that differs from what this project was written for fails at build time,
not at run time.

``$MDEVCORE_LIBVFIO_USER`` (a path to a libvfio-user.so.0) replaces the
installed library: it is loaded first, and the extension binds to it.

Nothing here is imported by the native transport.
"""

from __future__ import annotations

import ctypes
import functools
import importlib
import os
from typing import Any

CDEF = """
struct iovec { void *iov_base; size_t iov_len; ...; };
typedef int... loff_t;
typedef int... vfu_reset_type_t;
typedef int... vfu_migr_state_t;
typedef struct vfu_ctx vfu_ctx_t;
typedef struct dma_sg dma_sg_t;

size_t dma_sg_size(void);

vfu_ctx_t *vfu_create_ctx(int trans, const char *path, int flags, void *pvt, int dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);

typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t *log, int level);

typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf, size_t count,
                                         loff_t offset, bool is_write);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_t *region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas,
                     int fd, uint64_t offset);

typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, vfu_reset_type_t type);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t *reset);

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
    ...;
} vfu_dma_info_t;
typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, size_t max_regions,
                         vfu_dma_register_cb_t *dma_register,
                         vfu_dma_unregister_cb_t *dma_unregister);

int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, int type, uint32_t count);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);

typedef struct {
    int version;
    int (*transition)(vfu_ctx_t *vfu_ctx, vfu_migr_state_t state);
    ssize_t (*read_data)(vfu_ctx_t *vfu_ctx, void *buf, uint64_t count);
    ssize_t (*write_data)(vfu_ctx_t *vfu_ctx, void *buf, uint64_t count);
    ...;
} vfu_migration_callbacks_t;
int vfu_setup_device_migration_callbacks(vfu_ctx_t *vfu_ctx,
                                         const vfu_migration_callbacks_t *callbacks);

int vfu_addr_to_sgl(vfu_ctx_t *vfu_ctx, void *dma_addr, size_t len,
                    dma_sg_t *sgl, size_t max_nr_sgs, int prot);
void vfu_sgl_mark_dirty(vfu_ctx_t *vfu_ctx, dma_sg_t *sgl, size_t cnt);
int vfu_sgl_read(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
int vfu_sgl_write(vfu_ctx_t *vfu_ctx, dma_sg_t *sg, size_t sg_cnt, void *data, int flags);
bool vfu_sg_is_mappable(vfu_ctx_t *vfu_ctx, dma_sg_t *sg);

int vfu_pci_init(vfu_ctx_t *vfu_ctx, int pci_type, int hdr_type, int revision);
"""

# Constants of libvfio-user.h (enums and #defines are not in the cdef).
VFU_TRANS_SOCK = 0
VFU_DEV_TYPE_PCI = 0
LIBVFIO_USER_FLAG_ATTACH_NB = 1 << 0
VFU_REGION_FLAG_READ = 1 << 0
VFU_REGION_FLAG_WRITE = 1 << 1
VFU_REGION_FLAG_MEM = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB = 1 << 3
VFU_REGION_FLAG_64_BITS = 1 << 4
VFU_REGION_FLAG_PREFETCH = 1 << 5
VFU_RESET_DEVICE = 0
VFU_RESET_LOST_CONN = 1
VFU_RESET_PCI_FLR = 2
VFU_MIGR_CALLBACKS_VERS = 2
# vfu_migr_state_t
VFU_MIGR_STATE_STOP = 0
VFU_MIGR_STATE_RUNNING = 1
VFU_MIGR_STATE_STOP_AND_COPY = 2
VFU_MIGR_STATE_PRE_COPY = 3
VFU_MIGR_STATE_RESUME = 4
VFU_PCI_TYPE_CONVENTIONAL = 0
VFU_PCI_TYPE_EXPRESS = 3
PCI_HEADER_TYPE_NORMAL = 0
VFU_SGL_DIRECT_ACCESS = 1
LIBVFIO_USER_MAX_DMA_REGIONS = 1000 * 1000
LOG_DEBUG = 7
LOG_INFO = 6

ENV_LIBRARY = "MDEVCORE_LIBVFIO_USER"
SONAME = "libvfio-user.so.0"
EXTENSION = "_mdevcore_libvfio_user"
# Constants the build checks against the header (the values above).
HEADER_CONSTANTS = (
    "VFU_TRANS_SOCK", "VFU_DEV_TYPE_PCI", "LIBVFIO_USER_FLAG_ATTACH_NB",
    "VFU_REGION_FLAG_READ", "VFU_REGION_FLAG_WRITE", "VFU_REGION_FLAG_MEM",
    "VFU_REGION_FLAG_ALWAYS_CB", "VFU_REGION_FLAG_64_BITS", "VFU_REGION_FLAG_PREFETCH",
    "VFU_RESET_DEVICE", "VFU_RESET_LOST_CONN", "VFU_RESET_PCI_FLR", "VFU_MIGR_CALLBACKS_VERS",
    "VFU_MIGR_STATE_STOP", "VFU_MIGR_STATE_RUNNING", "VFU_MIGR_STATE_STOP_AND_COPY",
    "VFU_MIGR_STATE_PRE_COPY", "VFU_MIGR_STATE_RESUME", "VFU_PCI_TYPE_CONVENTIONAL",
    "VFU_PCI_TYPE_EXPRESS", "PCI_HEADER_TYPE_NORMAL", "VFU_SGL_DIRECT_ACCESS",
    "LIBVFIO_USER_MAX_DMA_REGIONS",
)  # fmt: skip

INSTALL_HINT = (
    "run ./setup.sh (it builds libvfio-user from $MDEVCORE_LIBVFIO_USER_SRC, by default "
    "../shared/vendor, into the venv, and compiles mdevcore's cffi module against it), "
    "or install libvfio-user and cffi and run "
    "python -m mdevcore.vfio_user.libvfio_user_build PREFIX; "
    "$MDEVCORE_LIBVFIO_USER may name another libvfio-user.so.0"
)


class LibvfioUserMissing(OSError):
    """cffi, the library or the compiled module cannot be loaded; the message says how."""


def full_cdef() -> str:
    """The declarations plus the header constants, as the build compiles them."""
    return CDEF + "".join(f"static const int {name};\n" for name in HEADER_CONSTANTS)


@functools.cache
def load() -> tuple[Any, Any]:
    """(ffi, lib), loaded once per process; LibvfioUserMissing if impossible."""
    override = os.environ.get(ENV_LIBRARY)
    if override:
        if not os.path.exists(override):
            raise LibvfioUserMissing(2, f"{ENV_LIBRARY}={override}: no such file; {INSTALL_HINT}")
        try:
            # Loaded first, it is the libvfio-user.so.0 the extension binds to.
            ctypes.CDLL(override, mode=ctypes.RTLD_GLOBAL)
        except OSError as e:
            raise LibvfioUserMissing(2, f"{ENV_LIBRARY}={override}: {e}; {INSTALL_HINT}") from None
    try:
        module = importlib.import_module(EXTENSION)
    except ImportError as e:
        raise LibvfioUserMissing(
            2, f"the libvfio-user transport is not built ({e}): {INSTALL_HINT}"
        ) from None
    lib = module.lib
    for name in HEADER_CONSTANTS:  # the build checked the header; this checks the build
        if getattr(lib, name) != globals()[name]:
            raise LibvfioUserMissing(2, f"{EXTENSION} was built for another libvfio-user ({name})")
    return module.ffi, lib


def available() -> str | None:
    """None when the transport can be used, else why not (for skips and errors)."""
    try:
        load()
    except LibvfioUserMissing as e:
        return str(e.strerror)
    return None

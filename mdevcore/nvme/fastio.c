/* The NVMe controller's common case in C: Read and Write of an I/O queue.
 *
 * nf_run() executes commands from one I/O submission queue while each is a
 * Read or Write that needs nothing but what is below: a namespace, a range
 * inside it, at most two PRP entries (no PRP list), guest memory inside one
 * DMA mapping per segment, and a free completion slot.  At the first entry
 * that is anything else, or on any failure, it stops *before* consuming
 * that entry, and the Python controller executes it (mdevcore.nvme.nvm):
 * that one path reports every error, so the checks here only decide
 * "mine or not", never a status.  An I/O error also stops it: the Python
 * path repeats the transfer and reports the error (a repeated read or write
 * of the same data to the same place changes nothing).
 *
 * The Python side (mdevcore/nvme/fastio.py) owns every table below and
 * rebuilds them when the DMA mappings change, and calls nf_run() only
 * under the device's lock, with no dirty logging in progress.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "NVMe structures are little-endian; this file reads them natively"
#endif

#define NF_READ 1u  /* VFIO_USER DMA_MAP flags */
#define NF_WRITE 2u

#define OPC_WRITE 0x01
#define OPC_READ 0x02
#define FLAGS_FUSE_PSDT 0xC3
#define CDW12_FUA (1u << 30)

struct nf_region {
    uint64_t iova;
    uint64_t size;
    uint8_t *host; /* NULL: mapped without an fd, reachable only by messages */
    uint32_t flags;
};

struct nf_ns {
    int direct_fd; /* -1 without O_DIRECT */
    int fd;
    uint64_t nlbas;
    uint32_t lba_shift;
    uint32_t write_through; /* VWC disabled: every write is made durable */
};

struct nf_ctx {
    struct nf_region *regions; /* sorted by iova, non-overlapping */
    uint32_t nregions;
    uint32_t last; /* the region the last lookup found */
    struct nf_ns *ns;
    uint32_t nns;
    uint32_t page_size;
    uint64_t max_transfer;
    /* SMART counters since the caller last took them */
    uint64_t bytes_read, bytes_written, reads, writes;
};

struct nf_queue {
    uint64_t sq_base;
    uint32_t sq_size, sq_head, sq_tail, sqid;
    uint64_t cq_base;
    uint32_t cq_size, cq_head, cq_tail, cq_phase;
};

static int inside(const struct nf_region *r, uint64_t iova, uint64_t len)
{
    return iova >= r->iova && len <= r->size && iova - r->iova <= r->size - len;
}

/* Host address of [iova, iova+len) if one mapping holds it all with `need`. */
static uint8_t *xlate(struct nf_ctx *c, uint64_t iova, uint64_t len, uint32_t need)
{
    const struct nf_region *r = NULL;
    if (len == 0)
        return NULL;
    if (c->last < c->nregions && inside(&c->regions[c->last], iova, len)) {
        r = &c->regions[c->last];
    } else {
        uint32_t lo = 0, hi = c->nregions; /* first region starting beyond iova */
        while (lo < hi) {
            uint32_t mid = lo + (hi - lo) / 2;
            if (c->regions[mid].iova <= iova)
                lo = mid + 1;
            else
                hi = mid;
        }
        if (lo == 0 || !inside(&c->regions[lo - 1], iova, len))
            return NULL;
        c->last = lo - 1;
        r = &c->regions[lo - 1];
    }
    if (r->host == NULL || (r->flags & need) != need)
        return NULL;
    return r->host + (iova - r->iova);
}

/* Move all `total` bytes, repeating short transfers; 0 on success. */
static int full_io(int fd, int write, struct iovec *iov, int n, uint64_t off, uint64_t total)
{
    while (total > 0) {
        ssize_t done = write ? pwritev(fd, iov, n, (off_t)off) : preadv(fd, iov, n, (off_t)off);
        if (done <= 0)
            return done == 0 ? EIO : errno;
        total -= (uint64_t)done;
        off += (uint64_t)done;
        while (n > 0 && (uint64_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

static int transfer(const struct nf_ns *ns, int write, struct iovec *iov, int n, uint64_t off,
                    uint64_t total)
{
    if (ns->direct_fd >= 0) {
        struct iovec copy[2];
        memcpy(copy, iov, sizeof(copy));
        int err = full_io(ns->direct_fd, write, copy, n, off, total);
        /* EINVAL: buffers O_DIRECT refuses; nothing moved, the page cache takes it. */
        if (err != EINVAL)
            return err;
    }
    return full_io(ns->fd, write, iov, n, off, total);
}

static uint32_t le32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

static uint64_t le64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof(v));
    return v;
}

/* Execute up to `limit` commands of q; returns how many completed here. */
uint32_t nf_run(struct nf_ctx *c, struct nf_queue *q, uint32_t limit)
{
    uint32_t done = 0;
    const uint64_t page = c->page_size;
    while (done < limit && q->sq_head != q->sq_tail && (q->cq_tail + 1) % q->cq_size != q->cq_head) {
        const uint8_t *slot = xlate(c, q->sq_base + (uint64_t)q->sq_head * 64, 64, NF_READ);
        if (slot == NULL)
            break;
        uint8_t e[64];
        memcpy(e, slot, sizeof(e)); /* the guest may rewrite the slot meanwhile */
        const uint8_t opcode = e[0];
        if ((opcode != OPC_READ && opcode != OPC_WRITE) || (e[1] & FLAGS_FUSE_PSDT))
            break;
        const int write = opcode == OPC_WRITE;
        const uint32_t nsid = le32(e + 4);
        if (nsid == 0 || nsid > c->nns)
            break;
        const struct nf_ns *ns = &c->ns[nsid - 1];
        const uint64_t slba = (uint64_t)le32(e + 44) << 32 | le32(e + 40);
        const uint32_t cdw12 = le32(e + 48);
        const uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
        if (slba > ns->nlbas || nlb > ns->nlbas - slba)
            break;
        const uint64_t length = nlb << ns->lba_shift;
        if (length > c->max_transfer)
            break;
        const uint64_t prp1 = le64(e + 24), prp2 = le64(e + 32);
        if (prp1 & 3)
            break;
        uint64_t first = page - (prp1 & (page - 1));
        if (first > length)
            first = length;
        /* A Read fills guest memory: the mapping must allow the device to write. */
        const uint32_t need = write ? NF_READ : NF_WRITE;
        struct iovec iov[2];
        int n = 1;
        iov[0].iov_base = xlate(c, prp1, first, need);
        iov[0].iov_len = first;
        if (iov[0].iov_base == NULL)
            break;
        if (length > first) {
            const uint64_t rest = length - first;
            if (rest > page || (prp2 & (page - 1)))
                break; /* a PRP list, or an invalid PRP2 */
            iov[1].iov_base = xlate(c, prp2, rest, need);
            iov[1].iov_len = rest;
            if (iov[1].iov_base == NULL)
                break;
            n = 2;
        }
        uint8_t *cqe = xlate(c, q->cq_base + (uint64_t)q->cq_tail * 16, 16, NF_WRITE);
        if (cqe == NULL)
            break;
        if (transfer(ns, write, iov, n, slba << ns->lba_shift, length) != 0)
            break;
        if (write && (ns->write_through || (cdw12 & CDW12_FUA)) && fdatasync(ns->fd) != 0)
            break;
        q->sq_head = (q->sq_head + 1) % q->sq_size;
        /* dw0, dw1, SQ head and SQ id, then the dword the host polls. */
        uint8_t head[12] = {0};
        const uint16_t sqhd = (uint16_t)q->sq_head, sqid = (uint16_t)q->sqid;
        memcpy(head + 8, &sqhd, 2);
        memcpy(head + 10, &sqid, 2);
        memcpy(cqe, head, sizeof(head));
        const uint32_t last = (uint32_t)le32(e + 0) >> 16 | (q->cq_phase & 1u) << 16;
        __atomic_thread_fence(__ATOMIC_RELEASE);
        if (((uintptr_t)(cqe + 12) & 3) == 0)
            __atomic_store_n((uint32_t *)(cqe + 12), last, __ATOMIC_RELAXED);
        else
            memcpy(cqe + 12, &last, 4);
        if (++q->cq_tail == q->cq_size) {
            q->cq_tail = 0;
            q->cq_phase ^= 1;
        }
        if (write) {
            c->bytes_written += length;
            c->writes++;
        } else {
            c->bytes_read += length;
            c->reads++;
        }
        done++;
    }
    return done;
}

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
 * Queue depth: the commands found together (up to NF_BATCH) go to the
 * kernel together, as Linux AIO on the O_DIRECT descriptor, so the backing
 * store sees the guest's queue depth rather than one command at a time.
 * A batch holds no two commands that touch the same blocks or the same
 * guest memory where either writes, so the result is what executing them
 * one by one in queue order gives; a conflicting command starts the next
 * batch.
 *
 * The Python side (mdevcore/nvme/fastio.py) owns every table below and
 * rebuilds them when the DMA mappings change, and calls nf_run() only
 * under the device's lock, with no dirty logging in progress.
 */
#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
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
#define NF_BATCH 64

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
    uint64_t aio; /* aio_context_t, set up on first use; 0: none */
    uint32_t aio_broken; /* io_setup failed: one command at a time */
    uint64_t batched;    /* commands completed through AIO batches */
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

/* One command found eligible, with everything needed to run and complete it. */
struct op {
    struct iovec iov[2];
    int n;
    int write;
    int sync; /* fdatasync after the write (FUA, or the write cache is off) */
    const struct nf_ns *ns;
    uint64_t off, length;
    uint8_t *cqe;
    uint16_t cid;
};

/* Whether the SQ entry at `head` is a command this file completes; fills *op. */
static int prepare(struct nf_ctx *c, const struct nf_queue *q, uint32_t head, uint32_t cq_slot,
                   struct op *op)
{
    const uint64_t page = c->page_size;
    const uint8_t *slot = xlate(c, q->sq_base + (uint64_t)head * 64, 64, NF_READ);
    if (slot == NULL)
        return 0;
    uint8_t e[64];
    memcpy(e, slot, sizeof(e)); /* the guest may rewrite the slot meanwhile */
    const uint8_t opcode = e[0];
    if ((opcode != OPC_READ && opcode != OPC_WRITE) || (e[1] & FLAGS_FUSE_PSDT))
        return 0;
    op->write = opcode == OPC_WRITE;
    const uint32_t nsid = le32(e + 4);
    if (nsid == 0 || nsid > c->nns)
        return 0;
    op->ns = &c->ns[nsid - 1];
    const uint64_t slba = (uint64_t)le32(e + 44) << 32 | le32(e + 40);
    const uint32_t cdw12 = le32(e + 48);
    const uint64_t nlb = (uint64_t)(cdw12 & 0xFFFF) + 1;
    if (slba > op->ns->nlbas || nlb > op->ns->nlbas - slba)
        return 0;
    op->length = nlb << op->ns->lba_shift;
    op->off = slba << op->ns->lba_shift;
    if (op->length > c->max_transfer)
        return 0;
    const uint64_t prp1 = le64(e + 24), prp2 = le64(e + 32);
    if (prp1 & 3)
        return 0;
    uint64_t first = page - (prp1 & (page - 1));
    if (first > op->length)
        first = op->length;
    /* A Read fills guest memory: the mapping must allow the device to write. */
    const uint32_t need = op->write ? NF_READ : NF_WRITE;
    op->n = 1;
    op->iov[0].iov_base = xlate(c, prp1, first, need);
    op->iov[0].iov_len = first;
    if (op->iov[0].iov_base == NULL)
        return 0;
    if (op->length > first) {
        const uint64_t rest = op->length - first;
        if (rest > page || (prp2 & (page - 1)))
            return 0; /* a PRP list, or an invalid PRP2 */
        op->iov[1].iov_base = xlate(c, prp2, rest, need);
        op->iov[1].iov_len = rest;
        if (op->iov[1].iov_base == NULL)
            return 0;
        op->n = 2;
    }
    op->cqe = xlate(c, q->cq_base + (uint64_t)cq_slot * 16, 16, NF_WRITE);
    if (op->cqe == NULL)
        return 0;
    op->sync = op->write && (op->ns->write_through || (cdw12 & CDW12_FUA));
    op->cid = (uint16_t)(le32(e + 0) >> 16);
    return 1;
}

static int spans_overlap(const uint8_t *a, size_t alen, const uint8_t *b, size_t blen)
{
    return a < b + blen && b < a + alen;
}

/* Whether ops[k] may not run alongside ops[0..k): the same blocks, or the
 * same guest memory, with a write on either side. */
static int conflicts(const struct op *ops, uint32_t k)
{
    const struct op *x = &ops[k];
    for (uint32_t j = 0; j < k; j++) {
        const struct op *y = &ops[j];
        if ((x->write || y->write) && x->ns == y->ns && x->off < y->off + y->length &&
            y->off < x->off + x->length)
            return 1;
        /* A Read command writes guest memory. */
        if (x->write && y->write)
            continue;
        for (int a = 0; a < x->n; a++)
            for (int b = 0; b < y->n; b++)
                if (spans_overlap(x->iov[a].iov_base, x->iov[a].iov_len, y->iov[b].iov_base,
                                  y->iov[b].iov_len))
                    return 1;
    }
    return 0;
}

static int run_one(struct op *op)
{
    if (transfer(op->ns, op->write, op->iov, op->n, op->off, op->length) != 0)
        return 0;
    return !op->sync || fdatasync(op->ns->fd) == 0;
}

/* Run ops[0..k) together through Linux AIO; how many leading ones succeeded. */
static uint32_t run_batch(struct nf_ctx *c, struct op *ops, uint32_t k)
{
    struct iocb cbs[NF_BATCH], *ptrs[NF_BATCH];
    struct io_event events[NF_BATCH];
    int64_t res[NF_BATCH];
    for (uint32_t i = 0; i < k; i++) {
        memset(&cbs[i], 0, sizeof(cbs[i]));
        cbs[i].aio_data = i;
        cbs[i].aio_lio_opcode = ops[i].write ? IOCB_CMD_PWRITEV : IOCB_CMD_PREADV;
        cbs[i].aio_fildes = (uint32_t)ops[i].ns->direct_fd;
        cbs[i].aio_buf = (uint64_t)(uintptr_t)ops[i].iov;
        cbs[i].aio_nbytes = (uint64_t)ops[i].n;
        cbs[i].aio_offset = (int64_t)ops[i].off;
        ptrs[i] = &cbs[i];
        res[i] = -EIO;
    }
    long submitted = syscall(SYS_io_submit, c->aio, (long)k, ptrs);
    if (submitted <= 0)
        return 0;
    long got = 0;
    while (got < submitted) {
        long n = syscall(SYS_io_getevents, c->aio, submitted - got, submitted - got, events,
                         (struct timespec *)NULL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            /* Cannot tell what is still in flight: the context must not be
             * reused with those iocbs pointing into this stack frame. */
            syscall(SYS_io_destroy, c->aio);
            c->aio = 0;
            c->aio_broken = 1;
            return 0;
        }
        for (long i = 0; i < n; i++)
            res[events[i].data] = events[i].res;
        got += n;
    }
    uint32_t ok = 0;
    int synced = 0;
    while (ok < (uint32_t)submitted && res[ok] == (int64_t)ops[ok].length) {
        if (ops[ok].sync && !synced) {
            if (fdatasync(ops[ok].ns->fd) != 0)
                break;
            synced = 1; /* one inode: one fdatasync covers every write before it */
        }
        ok++;
    }
    return ok;
}

/* How many of ops[0..k) ran, in order: all at once when it can, else one by one. */
static uint32_t execute(struct nf_ctx *c, struct op *ops, uint32_t k)
{
    int together = k > 1 && !c->aio_broken;
    for (uint32_t i = 0; together && i < k; i++)
        together = ops[i].ns->direct_fd >= 0 && ops[i].ns == ops[0].ns;
    if (together && c->aio == 0) {
        aio_context_t ctx = 0;
        if (syscall(SYS_io_setup, NF_BATCH, &ctx) == 0)
            c->aio = ctx;
        else
            together = 0, c->aio_broken = 1;
    }
    if (together) {
        const uint32_t ok = run_batch(c, ops, k);
        c->batched += ok;
        return ok;
    }
    uint32_t i = 0;
    while (i < k && run_one(&ops[i]))
        i++;
    return i;
}

static void post(struct nf_ctx *c, struct nf_queue *q, const struct op *op)
{
    q->sq_head = (q->sq_head + 1) % q->sq_size;
    /* dw0, dw1, SQ head and SQ id, then the dword the host polls. */
    uint8_t head[12] = {0};
    const uint16_t sqhd = (uint16_t)q->sq_head, sqid = (uint16_t)q->sqid;
    memcpy(head + 8, &sqhd, 2);
    memcpy(head + 10, &sqid, 2);
    memcpy(op->cqe, head, sizeof(head));
    const uint32_t last = (uint32_t)op->cid | (q->cq_phase & 1u) << 16;
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (((uintptr_t)(op->cqe + 12) & 3) == 0)
        __atomic_store_n((uint32_t *)(op->cqe + 12), last, __ATOMIC_RELAXED);
    else
        memcpy(op->cqe + 12, &last, 4);
    if (++q->cq_tail == q->cq_size) {
        q->cq_tail = 0;
        q->cq_phase ^= 1;
    }
    if (op->write) {
        c->bytes_written += op->length;
        c->writes++;
    } else {
        c->bytes_read += op->length;
        c->reads++;
    }
}

/* Execute up to `limit` commands of q; returns how many completed here. */
uint32_t nf_run(struct nf_ctx *c, struct nf_queue *q, uint32_t limit)
{
    uint32_t done = 0;
    struct op ops[NF_BATCH];
    while (done < limit) {
        const uint32_t pending = (q->sq_tail + q->sq_size - q->sq_head) % q->sq_size;
        const uint32_t room = (q->cq_head + q->cq_size - q->cq_tail - 1) % q->cq_size;
        uint32_t want = limit - done;
        if (want > pending)
            want = pending;
        if (want > room)
            want = room;
        if (want > NF_BATCH)
            want = NF_BATCH;
        uint32_t k = 0;
        int theirs = 0; /* stopped at a command for the Python path */
        while (k < want) {
            if (!prepare(c, q, (q->sq_head + k) % q->sq_size, (q->cq_tail + k) % q->cq_size,
                         &ops[k])) {
                theirs = 1;
                break;
            }
            if (conflicts(ops, k))
                break; /* it opens the next batch */
            k++;
        }
        if (k == 0)
            break;
        const uint32_t ok = execute(c, ops, k);
        for (uint32_t i = 0; i < ok; i++)
            post(c, q, &ops[i]);
        done += ok;
        /* A failed command, or one not taken here, is at the head now: Python's. */
        if (ok < k || theirs)
            break;
    }
    return done;
}

/* Release what nf_run set up (the AIO context). */
void nf_close(struct nf_ctx *c)
{
    if (c->aio != 0)
        syscall(SYS_io_destroy, c->aio);
    c->aio = 0;
}

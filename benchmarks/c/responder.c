/*
 * Minimal vfio-user responder: the floor the Python server is compared with.
 *
 * Serves one client at a time on a UNIX socket.  Answers VERSION, REGION_READ
 * (zeros) and REGION_WRITE (honouring No_reply); everything else gets an
 * EINVAL error reply.  Same strategy as the Python server: read big chunks,
 * answer every whole message in them, send the replies in one write.
 *
 * With SPIN_US, after answering it polls that long for the next request
 * (non-blocking reads) before it blocks: the same trade as the Python
 * server's --spin-us, so the floor can be compared with the trick on both
 * sides.
 *
 * usage: responder SOCKET_PATH [SPIN_US]
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define HDR 16
#define F_REPLY 0x1
#define F_NO_REPLY 0x10
#define F_ERROR 0x20
#define CMD_VERSION 1
#define CMD_REGION_READ 9
#define CMD_REGION_WRITE 10
#define MAX_XFER (1 << 20)

struct hdr {
    uint16_t id, cmd;
    uint32_t size, flags, error;
};

static unsigned char inbuf[4 << 20];
static unsigned char outbuf[4 << 20];
static const unsigned char zeros[MAX_XFER];

static size_t put(size_t o, const void *p, size_t n) {
    memcpy(outbuf + o, p, n);
    return o + n;
}

static size_t reply_hdr(size_t o, const struct hdr *req, uint32_t payload, uint32_t err) {
    struct hdr h = {req->id, req->cmd, HDR + payload, F_REPLY | (err ? F_ERROR : 0), err};
    return put(o, &h, sizeof h);
}

static int write_all(int fd, const unsigned char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static long spin_ns; /* 0: block at once */

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

/* read(), polling for spin_ns first when asked to. */
static ssize_t next_read(int fd, void *buf, size_t len) {
    if (spin_ns) {
        const long end = now_ns() + spin_ns;
        do {
            ssize_t r = recv(fd, buf, len, MSG_DONTWAIT);
            if (r >= 0 || (errno != EAGAIN && errno != EWOULDBLOCK)) return r;
        } while (now_ns() < end);
    }
    return read(fd, buf, len);
}

static void serve(int fd) {
    static const char caps[] =
        "{\"capabilities\":{\"max_msg_fds\":8,\"max_data_xfer_size\":1048576}}";
    size_t have = 0;
    for (;;) {
        ssize_t r = next_read(fd, inbuf + have, sizeof inbuf - have);
        if (r <= 0) return;
        have += (size_t)r;
        size_t pos = 0, out = 0;
        while (have - pos >= HDR) {
            struct hdr h;
            memcpy(&h, inbuf + pos, HDR);
            if (h.size < HDR || h.size > sizeof inbuf / 2) return;
            if (have - pos < h.size) break;
            const unsigned char *body = inbuf + pos + HDR;
            uint32_t blen = h.size - HDR;
            int no_reply = h.flags & F_NO_REPLY;
            if (h.cmd == CMD_VERSION) {
                uint16_t ver[2] = {0, 0};
                out = reply_hdr(out, &h, 4 + sizeof caps, 0);
                out = put(out, ver, 4);
                out = put(out, caps, sizeof caps);
            } else if (h.cmd == CMD_REGION_READ && blen == 16) {
                uint32_t count;
                memcpy(&count, body + 12, 4);
                if (count > MAX_XFER) {
                    out = reply_hdr(out, &h, 0, EINVAL);
                } else {
                    out = reply_hdr(out, &h, 16 + count, 0);
                    out = put(out, body, 16);
                    out = put(out, zeros, count);
                }
            } else if (h.cmd == CMD_REGION_WRITE && blen >= 16) {
                if (!no_reply) {
                    out = reply_hdr(out, &h, 16, 0);
                    out = put(out, body, 16);
                }
            } else if (!no_reply) {
                out = reply_hdr(out, &h, 0, EINVAL);
            }
            pos += h.size;
            if (out > sizeof outbuf - MAX_XFER - 64) {
                if (write_all(fd, outbuf, out)) return;
                out = 0;
            }
        }
        if (out && write_all(fd, outbuf, out)) return;
        memmove(inbuf, inbuf + pos, have - pos);
        have -= pos;
    }
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s SOCKET_PATH [SPIN_US]\n", argv[0]);
        return 2;
    }
    if (argc == 3) spin_ns = (long)(atof(argv[2]) * 1000);
    int ls = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    unlink(argv[1]);
    if (bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 4)) {
        perror("bind/listen");
        return 1;
    }
    for (;;) {
        int fd = accept(ls, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR) continue;
            perror("accept");
            return 1;
        }
        serve(fd);
        close(fd);
    }
}

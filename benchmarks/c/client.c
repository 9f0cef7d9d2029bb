/*
 * Minimal vfio-user benchmark client: REGION_READ round trips and posted
 * REGION_WRITE throughput against any vfio-user server.
 *
 * usage: client SOCKET_PATH N_READS N_WRITES
 * prints: "rtt_median_us X rtt_p99_us Y posted_msgs_per_s Z"
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

struct hdr {
    uint16_t id, cmd;
    uint32_t size, flags, error;
};
struct access {
    uint64_t offset;
    uint32_t region, count;
};

static int fd;
static unsigned char buf[1 << 16];

static double now_us(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static void read_exact(void *p, size_t n) {
    unsigned char *c = p;
    while (n) {
        ssize_t r = read(fd, c, n);
        if (r <= 0) {
            perror("read");
            exit(1);
        }
        c += r;
        n -= (size_t)r;
    }
}

static void write_exact(const void *p, size_t n) {
    const unsigned char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w <= 0) {
            perror("write");
            exit(1);
        }
        c += w;
        n -= (size_t)w;
    }
}

static struct hdr recv_reply(void) {
    struct hdr h;
    read_exact(&h, sizeof h);
    if (h.size < 16 || h.size - 16 > sizeof buf) exit(3);
    read_exact(buf, h.size - 16);
    if (h.flags & 0x20) {
        fprintf(stderr, "error reply %u to cmd %u\n", h.error, h.cmd);
        exit(4);
    }
    return h;
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s SOCKET N_READS N_WRITES\n", argv[0]);
        return 2;
    }
    int nreads = atoi(argv[2]), nwrites = atoi(argv[3]);
    fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    strncpy(sa.sun_path, argv[1], sizeof sa.sun_path - 1);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa)) {
        perror("connect");
        return 1;
    }
    static const char caps[] = "{\"capabilities\":{\"max_msg_fds\":8}}";
    unsigned char msg[64 + sizeof caps];
    struct hdr h = {1, 1, 16 + 4 + sizeof caps, 0, 0};
    uint16_t ver[2] = {0, 0};
    memcpy(msg, &h, 16);
    memcpy(msg + 16, ver, 4);
    memcpy(msg + 20, caps, sizeof caps);
    write_exact(msg, h.size);
    recv_reply();

    int warm = 1000;
    double *t = malloc(sizeof(double) * (size_t)nreads);
    struct access a = {0, 0, 4};
    for (int i = 0; i < warm + nreads; i++) {
        struct hdr rh = {(uint16_t)i, 9, 32, 0, 0};
        memcpy(msg, &rh, 16);
        memcpy(msg + 16, &a, 16);
        double t0 = now_us();
        write_exact(msg, 32);
        recv_reply();
        if (i >= warm) t[i - warm] = now_us() - t0;
    }
    qsort(t, (size_t)nreads, sizeof(double), cmp);
    double median = t[nreads / 2], p99 = t[(int)(nreads * 0.99)];

    double t0 = now_us();
    for (int i = 0; i < nwrites; i++) {
        struct hdr wh = {(uint16_t)i, 10, 36, 0x10, 0};
        memcpy(msg, &wh, 16);
        memcpy(msg + 16, &a, 16);
        memcpy(msg + 32, "abcd", 4);
        write_exact(msg, 36);
    }
    struct hdr rh = {7, 9, 32, 0, 0};
    memcpy(msg, &rh, 16);
    memcpy(msg + 16, &a, 16);
    write_exact(msg, 32);
    recv_reply();
    double rate = nwrites / ((now_us() - t0) / 1e6);
    printf("rtt_median_us %.2f rtt_p99_us %.2f posted_msgs_per_s %.0f\n", median, p99, rate);
    return 0;
}

/*
 * hostile: a guest program that does what a hostile root may do to the host, for
 * tests/test_hostile_guest.py (DESIGN.md, "Trust model": the guest is hostile).
 *
 * It speaks on the agent's own channel: the agent (PID 1, which cannot be killed) holds the
 * virtio-serial port "sm.agent" open, and a port takes one opener, so we take a copy of the
 * agent's descriptor with pidfd_getfd(2) and write alongside it. The agent only writes when
 * asked something, and the host asks nothing while this runs, so our frames never land in
 * the middle of one of its frames.
 *
 *   hostile hello COUNT            COUNT forged HELLO frames
 *   hostile error COUNT            COUNT forged ERROR frames (stream 0 and unknown streams)
 *   hostile flood STREAM BYTES     STDOUT frames on STREAM, BYTES in all (past the credit)
 *   hostile frame TYPE STREAM HEX  one frame with a payload of our choosing (a bad shape)
 *   hostile garbage                bytes that are no frame header
 *   hostile oom-panic              exhaust memory so that the kernel panics: this process
 *                                  is made unkillable by the OOM killer (oom_score_adj
 *                                  -1000) and PID 1 never is a victim, so the kernel finds
 *                                  nothing to kill ("System is deadlocked on memory")
 *
 * Build: musl-gcc -static -O2 -o hostile hostile.c
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "protocol.h" /* the agent's own framing (native/guest/agent/protocol.c) */

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif


static void put_u32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static void die(const char *what)
{
    fprintf(stderr, "hostile: %s: %s\n", what, strerror(errno));
    exit(1);
}

/* ---- the channel ------------------------------------------------------------------------- */

static int channel = -1;
static uint8_t out_buf[1 << 20];
static size_t out_len;
static unsigned long long frames_sent, bytes_sent;

/* Our copy of the agent's descriptor of /dev/vportNpM (the port named sm.agent). */
static int take_channel(void)
{
    char port[300] = "";
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    while (d && (e = readdir(d))) {
        char path[300], name[64] = "";
        if (e->d_name[0] == '.')
            continue;
        snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
        FILE *f = fopen(path, "r");
        if (f && fgets(name, sizeof name, f) && strncmp(name, "sm.agent", 8) == 0)
            snprintf(port, sizeof port, "/dev/%s", e->d_name);
        if (f)
            fclose(f);
    }
    if (d)
        closedir(d);
    if (!port[0]) {
        errno = ENOENT;
        die("no virtio port named sm.agent");
    }
    int pidfd = (int)syscall(SYS_pidfd_open, 1, 0);
    if (pidfd < 0)
        die("pidfd_open(1)");
    for (int fd = 0; fd < 1024; fd++) {
        char link[64], target[300];
        snprintf(link, sizeof link, "/proc/1/fd/%d", fd);
        ssize_t n = readlink(link, target, sizeof target - 1);
        if (n <= 0)
            continue;
        target[n] = 0;
        if (strcmp(target, port) == 0) {
            int ours = (int)syscall(SYS_pidfd_getfd, pidfd, fd, 0);
            if (ours < 0)
                die("pidfd_getfd");
            return ours;
        }
    }
    errno = ENOENT;
    die("the agent holds no descriptor of the port");
    return -1;
}

static void flush_out(void)
{
    size_t done = 0;
    while (done < out_len) {
        ssize_t w = write(channel, out_buf + done, out_len - done);
        if (w < 0 && (errno == EAGAIN || errno == EINTR)) {
            struct pollfd p = { .fd = channel, .events = POLLOUT };
            poll(&p, 1, 100);
            continue;
        }
        if (w <= 0) {
            /* The host hung up on us (it should, after a protocol violation): done. */
            fprintf(stderr, "hostile: channel write: %s (after %llu frames)\n",
                    w < 0 ? strerror(errno) : "EOF", frames_sent);
            out_len = 0;
            return;
        }
        done += (size_t)w;
        bytes_sent += (unsigned long long)w;
    }
    out_len = 0;
}

static void send_raw(const uint8_t *p, size_t n)
{
    if (out_len + n > sizeof out_buf)
        flush_out();
    memcpy(out_buf + out_len, p, n);
    out_len += n;
}

static void send_frame(uint8_t type, uint32_t stream, const uint8_t *payload, uint32_t len)
{
    uint8_t h[SM_HEADER_BYTES];
    sm_encode_header(h, type, stream, len);
    send_raw(h, sizeof h);
    if (len)
        send_raw(payload, len);
    frames_sent++;
}

/* u32, then str: the payload of HELLO and ERROR. */
static uint32_t u32_str(uint8_t *p, uint32_t value, const char *text)
{
    uint32_t n = (uint32_t)strlen(text);
    put_u32(p, value);
    put_u32(p + 4, n);
    memcpy(p + 8, text, n);
    return 8 + n;
}

/* ---- the attacks ------------------------------------------------------------------------- */

static void oom_panic(void)
{
    int fd = open("/proc/self/oom_score_adj", O_WRONLY);
    if (fd < 0 || write(fd, "-1000", 5) != 5)
        die("oom_score_adj");
    close(fd);
    printf("eating memory\n");
    fflush(stdout);
    for (;;) {
        char *p = mmap(NULL, 1 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p != MAP_FAILED)
            memset(p, 0x5A, 1 << 20);
    }
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

int main(int argc, char **argv)
{
    static uint8_t payload[SM_MAX_CHUNK_BYTES];
    if (argc < 2) {
        fprintf(stderr, "usage: hostile hello|error|flood|frame|garbage|oom-panic ...\n");
        return 2;
    }
    const char *mode = argv[1];
    if (strcmp(mode, "oom-panic") == 0)
        oom_panic();
    channel = take_channel();
    /* Let the agent finish what it is sending (our STARTED) before we speak. */
    usleep(300 * 1000);

    if (strcmp(mode, "hello") == 0 && argc == 3) {
        unsigned long count = strtoul(argv[2], NULL, 0);
        uint32_t n = u32_str(payload, 1, "forged agent");
        for (unsigned long i = 0; i < count; i++)
            send_frame(SM_HELLO, 0, payload, n);
    } else if (strcmp(mode, "error") == 0 && argc == 3) {
        unsigned long count = strtoul(argv[2], NULL, 0);
        for (unsigned long i = 0; i < count; i++) {
            char text[64];
            snprintf(text, sizeof text, "forged error %lu", i);
            uint32_t n = u32_str(payload, 4, text);
            send_frame(SM_ERROR, (i & 1) ? 0x70000000u + (uint32_t)i : 0, payload, n);
        }
    } else if (strcmp(mode, "flood") == 0 && argc == 4) {
        uint32_t stream = (uint32_t)strtoul(argv[2], NULL, 0);
        unsigned long long left = strtoull(argv[3], NULL, 0);
        memset(payload, 'F', sizeof payload);
        while (left) {
            uint32_t n = left < SM_MAX_CHUNK_BYTES ? (uint32_t)left : SM_MAX_CHUNK_BYTES;
            send_frame(SM_STDOUT, stream, payload, n);
            left -= n;
        }
    } else if (strcmp(mode, "frame") == 0 && argc == 5) {
        uint8_t type = (uint8_t)strtoul(argv[2], NULL, 0);
        uint32_t stream = (uint32_t)strtoul(argv[3], NULL, 0);
        const char *hex = argv[4];
        uint32_t n = 0;
        for (; hex[0] && hex[1] && n < sizeof payload; hex += 2)
            payload[n++] = (uint8_t)(hex_value(hex[0]) << 4 | hex_value(hex[1]));
        send_frame(type, stream, payload, n);
    } else if (strcmp(mode, "garbage") == 0 && argc == 2) {
        static const char junk[] = "this is no frame header, and neither is this";
        send_raw((const uint8_t *)junk, sizeof junk - 1);
    } else {
        fprintf(stderr, "hostile: bad arguments for %s\n", mode);
        return 2;
    }
    flush_out();
    printf("sent %llu frames, %llu bytes\n", frames_sent, bytes_sent);
    return 0;
}

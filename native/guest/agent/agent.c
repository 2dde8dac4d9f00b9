/*
 * supermachine-agent: runs commands for the host inside the guest.
 *
 * One single-threaded poll loop serves the host connection (virtio-serial port or vsock,
 * see PROTOCOL.md), the pipes of every running command, and SIGCHLD (signalfd). It runs
 * as PID 1 (init execs it), so it also reaps orphans. Nothing the host sends can make it
 * exit: every bad frame gets an ERROR frame and is dropped.
 */
#define _GNU_SOURCE
#include "dispatch.h"
#include "protocol.h"
#include "users.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define AGENT_SOFTWARE "supermachine-agent 0.1"
/* After a command exits, output pipes still held open by its background children are
 * closed once they have been quiet this long, so `server &` does not hang the exec... */
#define EXIT_DRAIN_QUIET_MS 250
/* ...or, when they keep writing, this long after the exit: an escaped child never holds
 * the EXIT back. */
#define EXIT_DRAIN_MAX_MS 1000
#define BASE_PATH "PATH=/usr/sbin:/usr/bin:/sbin:/bin"

/* AF_VSOCK address; defined here because musl ships no linux/vm_sockets.h. */
struct sockaddr_vm_compat {
    sa_family_t svm_family;
    unsigned short svm_reserved1;
    unsigned int svm_port;
    unsigned int svm_cid;
    unsigned char svm_zero[sizeof(struct sockaddr) - sizeof(sa_family_t) - sizeof(unsigned short)
                           - 2 * sizeof(unsigned int)];
};
#define AF_VSOCK_COMPAT 40
#define VMADDR_CID_ANY_COMPAT 0xFFFFFFFFu

enum stream_kind { STREAM_FREE, STREAM_EXEC, STREAM_READ_FILE };

struct stream {
    enum stream_kind kind;
    uint32_t id;
    pid_t pid;
    int stdin_fd;        /* write end of the command's stdin, -1 when closed */
    int stdout_fd;       /* read ends, -1 at EOF */
    int stderr_fd;
    int file_fd;         /* READ_FILE source */
    uint64_t file_sent;
    int64_t out_credit;  /* bytes we may still send */
    uint8_t *stdin_buf;  /* pending stdin, at most SM_INITIAL_WINDOW_BYTES */
    size_t stdin_len;
    int stdin_close_pending;
    int exited;
    int killed;          /* the host sent SIGKILL: EXIT as soon as the command is reaped */
    size_t left_at_exit[2];  /* stdout/stderr bytes still in the pipes when it was reaped */
    int exit_code;
    int exit_signal;
    long long exited_at_ms;
    long long last_output_ms;
};

static struct stream streams[SM_MAX_STREAMS];
static int conn_fd = -1;
static int listen_fd = -1;   /* vsock transport only */
static uint8_t *out_frame;   /* header + one chunk */

/* ----------------------------------------------------------------------------------- */

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void log_line(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "supermachine-agent: ");
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

/* Write everything, waiting while the peer is slow; gives up (-1) when the peer hangs up,
 * so a host that went away never blocks the agent (the connection fd is non-blocking: a
 * virtio-serial port with no host would otherwise block write(2) until one connects). */
static int write_all(int fd, const uint8_t *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN) {
                struct pollfd pfd = { .fd = fd, .events = POLLOUT };
                if (poll(&pfd, 1, 100) > 0 && (pfd.revents & (POLLHUP | POLLERR))
                    && !(pfd.revents & POLLOUT))
                    return -1;
                continue;
            }
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Send one frame; a failed write means the host went away, which the read side notices. */
static void send_frame(uint8_t type, uint32_t stream, const uint8_t *payload, size_t len)
{
    uint8_t header[SM_HEADER_BYTES];
    if (conn_fd < 0)
        return;
    sm_encode_header(header, type, stream, (uint32_t)len);
    if (write_all(conn_fd, header, sizeof header) == 0 && len)
        write_all(conn_fd, payload, len);
}

static void send_error(uint32_t stream, uint32_t code, const char *fmt, ...)
{
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        n = 0;
    if ((size_t)n >= sizeof msg)
        n = sizeof msg - 1;
    struct sm_builder b = { 0 };
    if (sm_put_u32(&b, code) && sm_put_str(&b, msg, (size_t)n))
        send_frame(SM_ERROR, stream, b.data, b.len);
    sm_builder_free(&b);
}

static void send_u32(uint8_t type, uint32_t stream, uint32_t value)
{
    struct sm_builder b = { 0 };
    if (sm_put_u32(&b, value))
        send_frame(type, stream, b.data, b.len);
    sm_builder_free(&b);
}

static void send_ok(uint32_t stream, uint64_t value)
{
    struct sm_builder b = { 0 };
    if (sm_put_u64(&b, value))
        send_frame(SM_OK, stream, b.data, b.len);
    sm_builder_free(&b);
}

/* ----------------------------------------------------------------------------------- */

static struct stream *find_stream(uint32_t id)
{
    if (id == 0)
        return NULL;
    for (int i = 0; i < SM_MAX_STREAMS; i++)
        if (streams[i].kind != STREAM_FREE && streams[i].id == id)
            return &streams[i];
    return NULL;
}

static struct stream *new_stream(uint32_t id, enum stream_kind kind)
{
    for (int i = 0; i < SM_MAX_STREAMS; i++) {
        if (streams[i].kind == STREAM_FREE) {
            struct stream *s = &streams[i];
            memset(s, 0, sizeof *s);
            s->kind = kind;
            s->id = id;
            s->pid = -1;
            s->stdin_fd = s->stdout_fd = s->stderr_fd = s->file_fd = -1;
            s->out_credit = SM_INITIAL_WINDOW_BYTES;
            s->last_output_ms = now_ms();
            return s;
        }
    }
    return NULL;
}

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);
    *fd = -1;
}

static void free_stream(struct stream *s)
{
    close_fd(&s->stdin_fd);
    close_fd(&s->stdout_fd);
    close_fd(&s->stderr_fd);
    close_fd(&s->file_fd);
    free(s->stdin_buf);
    memset(s, 0, sizeof *s);
    s->kind = STREAM_FREE;
}

/* A new HELLO (or a lost connection) ends the session: its commands die with it. */
static void forget_streams(void)
{
    for (int i = 0; i < SM_MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (s->kind == STREAM_EXEC && !s->exited && s->pid > 0)
            kill(-s->pid, SIGKILL);
        if (s->kind != STREAM_FREE)
            free_stream(s);
    }
}

/* Is this stream id free for a new request? Sends the error when it is not. */
static int claim_ok(const struct sm_header *h)
{
    if (h->stream == 0) {
        send_error(0, SM_E_BAD_STREAM, "frame type 0x%02x needs a non-zero stream id", h->type);
        return 0;
    }
    if (find_stream(h->stream)) {
        send_error(h->stream, SM_E_BAD_STREAM, "stream %u is already in use", h->stream);
        return 0;
    }
    return 1;
}

/* Copy a protocol string into a fresh NUL-terminated one; rejects embedded NULs. */
static char *dup_str(const uint8_t *p, uint32_t len)
{
    if (memchr(p, 0, len))
        return NULL;
    char *s = malloc((size_t)len + 1);
    if (s) {
        memcpy(s, p, len);
        s[len] = 0;
    }
    return s;
}

/* Free a vector from get_strv(): `extra` leading slots (maybe NULL), then the strings. */
static void free_strv(char **v, size_t extra)
{
    if (!v)
        return;
    for (size_t i = 0; i < extra; i++)
        free(v[i]);
    for (char **p = v + extra; *p; p++)
        free(*p);
    free(v);
}

/* Decode a str[]; `extra` leaves that many NULL slots at the front for the caller. */
static char **get_strv(struct sm_cursor *c, uint32_t max, size_t extra, uint32_t *count)
{
    uint32_t n;
    if (!sm_get_u32(c, &n) || n > max)
        return NULL;
    char **v = calloc((size_t)n + extra + 1, sizeof *v);
    if (!v)
        return NULL;
    for (uint32_t i = 0; i < n; i++) {
        const uint8_t *p;
        uint32_t len;
        if (!sm_get_str(c, &p, &len) || !(v[extra + i] = dup_str(p, len))) {
            for (size_t k = extra; k < extra + i; k++)
                free(v[k]);
            free(v);
            return NULL;
        }
    }
    *count = n;
    return v;
}

/* ----------------------------------------------------------------------------------- */

static void handle_exec(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t mode, argc = 0, envc = 0, flags, cwd_len, user_len = 0;
    const uint8_t *cwd_p, *user_p = NULL;
    char **argv = NULL, **env = NULL, *cwd = NULL, *user = NULL;
    int in_pipe[2] = { -1, -1 }, out_pipe[2] = { -1, -1 }, err_pipe[2] = { -1, -1 };
    int status_pipe[2] = { -1, -1 };

    if (!claim_ok(h))
        return;
    if (!sm_get_u32(c, &mode) || mode > 1 || !(argv = get_strv(c, 4096, 2, &argc))
        || argc == 0 || (mode == 1 && argc != 1)
        || !(env = get_strv(c, 4096, 1, &envc)) || !sm_get_str(c, &cwd_p, &cwd_len)
        || !(cwd = dup_str(cwd_p, cwd_len)) || !sm_get_u32(c, &flags) || flags > 3
        || ((flags & 2) && (!sm_get_str(c, &user_p, &user_len) || user_len == 0
                            || user_len > 255 || !(user = dup_str(user_p, user_len))))
        || !sm_at_end(c)) {
        send_error(h->stream, SM_E_BAD_PAYLOAD, "malformed EXEC payload");
        goto out;
    }
    struct stream *s = new_stream(h->stream, STREAM_EXEC);
    if (!s) {
        send_error(h->stream, SM_E_TOO_MANY, "more than %d open streams", SM_MAX_STREAMS);
        goto out;
    }
    env[0] = strdup(BASE_PATH);
    char *const *exec_argv = argv + 2;
    if (mode == 1) {
        argv[0] = strdup("/bin/sh");
        argv[1] = strdup("-c");
        exec_argv = argv;
    }
    if (((flags & 1) && pipe2(in_pipe, O_CLOEXEC)) || pipe2(out_pipe, O_CLOEXEC)
        || pipe2(err_pipe, O_CLOEXEC) || pipe2(status_pipe, O_CLOEXEC)) {
        send_error(h->stream, SM_E_EXEC_FAILED, "pipe: %s", strerror(errno));
        free_stream(s);
        goto close_pipes;
    }
    pid_t pid = fork();
    if (pid < 0) {
        send_error(h->stream, SM_E_EXEC_FAILED, "fork: %s", strerror(errno));
        free_stream(s);
        goto close_pipes;
    }
    if (pid == 0) {
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGPIPE, SIG_DFL);
        setsid();
        int in = (flags & 1) ? in_pipe[0] : open("/dev/null", O_RDONLY);
        dup2(in, 0);
        dup2(out_pipe[1], 1);
        dup2(err_pipe[1], 2);
        const char *stage = "chdir";
        if (user) {
            /* The user is resolved here, in the child: the image's files could make a
             * lookup slow, and the agent's loop must never wait on them. */
            struct sm_user who;
            char why[240];
            if (sm_resolve_user(user, &who, why, sizeof why) < 0) {
                char text[256];
                int n = snprintf(text, sizeof text, "u%s", why);
                (void)!write(status_pipe[1], text, (size_t)(n < (int)sizeof text ? n : (int)sizeof text - 1));
                _exit(127);
            }
            if (*who.home)
                setenv("HOME", who.home, 1);   /* the request's env may still set its own */
            if (sm_become_user(&who) < 0) {
                char text[256];
                int n = snprintf(text, sizeof text, "ucannot become user '%s' (uid %u, gid %u): %s",
                                 user, (unsigned)who.uid, (unsigned)who.gid, strerror(errno));
                (void)!write(status_pipe[1], text, (size_t)(n < (int)sizeof text ? n : (int)sizeof text - 1));
                _exit(127);
            }
        }
        if (chdir(*cwd ? cwd : "/") == 0) {
            stage = "exec";
            /* The base PATH comes first so that the command's own PATH (if any) wins. */
            for (char **e = env; *e; e++)
                putenv(*e);
            execvp(exec_argv[0], exec_argv);
        }
        int err = errno;
        char msg[8] = { 0 };
        msg[0] = stage[0];
        memcpy(msg + 1, &err, sizeof err);
        (void)!write(status_pipe[1], msg, sizeof msg);
        _exit(127);
    }
    /* The child reports a failed chdir/exec through status_pipe; EOF means exec succeeded. */
    close_fd(&status_pipe[1]);
    char msg[256];
    ssize_t got;
    do {
        got = read(status_pipe[0], msg, sizeof msg);
    } while (got < 0 && errno == EINTR);
    if (got > 1 && msg[0] == 'u') {
        send_error(h->stream, SM_E_EXEC_FAILED, "%.*s", (int)got - 1, msg + 1);
        waitpid(pid, NULL, 0);
        free_stream(s);
        goto close_pipes;
    }
    if (got == 8) {
        int err;
        memcpy(&err, msg + 1, sizeof err);
        send_error(h->stream, SM_E_EXEC_FAILED, "%s %s: %s", msg[0] == 'c' ? "chdir" : "exec",
                   msg[0] == 'c' ? (*cwd ? cwd : "/") : exec_argv[0], strerror(err));
        waitpid(pid, NULL, 0);
        free_stream(s);
        goto close_pipes;
    }
    s->pid = pid;
    s->stdin_fd = in_pipe[1];
    in_pipe[1] = -1;
    s->stdout_fd = out_pipe[0];
    out_pipe[0] = -1;
    s->stderr_fd = err_pipe[0];
    err_pipe[0] = -1;
    if (s->stdin_fd >= 0)
        fcntl(s->stdin_fd, F_SETFL, O_NONBLOCK);
    send_u32(SM_STARTED, h->stream, (uint32_t)pid);

close_pipes:
    for (int i = 0; i < 2; i++) {
        close_fd(&in_pipe[i]);
        close_fd(&out_pipe[i]);
        close_fd(&err_pipe[i]);
        close_fd(&status_pipe[i]);
    }
out:
    free_strv(argv, 2);
    free_strv(env, 1);
    free(cwd);
    free(user);
}

static void handle_stdin(const struct sm_header *h, struct sm_cursor *c)
{
    const uint8_t *payload = c->data;
    struct stream *s = find_stream(h->stream);
    if (!s || s->kind != STREAM_EXEC || s->stdin_close_pending
        || (s->stdin_fd < 0 && !s->exited)) {
        send_error(h->stream, SM_E_BAD_STREAM, "stream %u takes no stdin", h->stream);
        return;
    }
    if (h->length == 0) {
        s->stdin_close_pending = 1;
        return;
    }
    if (s->stdin_fd < 0) {
        /* The command is gone: drop the bytes but return the credit. */
        send_u32(SM_CREDIT, h->stream, h->length);
        return;
    }
    if (s->stdin_len + h->length > SM_INITIAL_WINDOW_BYTES) {
        send_error(h->stream, SM_E_FLOW, "stdin beyond the granted credit (%zu + %u > %u)",
                   s->stdin_len, h->length, SM_INITIAL_WINDOW_BYTES);
        return;
    }
    if (!s->stdin_buf && !(s->stdin_buf = malloc(SM_INITIAL_WINDOW_BYTES))) {
        send_error(h->stream, SM_E_IO_FAILED, "out of memory for stdin");
        return;
    }
    memcpy(s->stdin_buf + s->stdin_len, payload, h->length);
    s->stdin_len += h->length;
}

static void handle_signal(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t signo;
    struct stream *s = find_stream(h->stream);
    if (!s || s->kind != STREAM_EXEC) {
        send_error(h->stream, SM_E_BAD_STREAM, "no command runs on stream %u", h->stream);
        return;
    }
    if (!sm_get_u32(c, &signo) || !sm_at_end(c) || signo < 1 || signo > 64) {
        send_error(h->stream, SM_E_BAD_PAYLOAD, "SIGNAL needs one u32 from 1 to 64");
        return;
    }
    if (signo == SIGKILL)
        s->killed = 1;
    if (s->pid > 0)
        kill(-s->pid, (int)signo);  /* ESRCH: the group is already gone, nothing to do */
}

static void handle_credit(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t bytes;
    struct stream *s = find_stream(h->stream);
    if (!s) {
        send_error(h->stream, SM_E_BAD_STREAM, "no stream %u to credit", h->stream);
        return;
    }
    if (!sm_get_u32(c, &bytes) || !sm_at_end(c)) {
        send_error(h->stream, SM_E_BAD_PAYLOAD, "CREDIT needs one u32");
        return;
    }
    s->out_credit += bytes;
    if (s->out_credit > (int64_t)1 << 40)
        s->out_credit = (int64_t)1 << 40;
}

/* The host gave a stream up (an ERROR frame on it): a command's process group is killed and
 * its pipes closed, a file is closed; nothing more is sent on the stream. */
static void handle_abandon(const struct sm_header *h, struct sm_cursor *c)
{
    (void)c;
    struct stream *s = find_stream(h->stream);
    if (!s)
        return;  /* already ended: its last frame crossed the host's ERROR */
    if (s->kind == STREAM_EXEC && !s->exited && s->pid > 0)
        kill(-s->pid, SIGKILL);  /* the zombie is reaped by reap_children() */
    free_stream(s);
}

static char *get_path(struct sm_cursor *c)
{
    const uint8_t *p;
    uint32_t len;
    if (!sm_get_str(c, &p, &len) || len == 0 || len > 4096)
        return NULL;
    return dup_str(p, len);
}

/* What a file that is not a regular file is, for error messages. */
static const char *file_kind(mode_t mode)
{
    if (S_ISDIR(mode))
        return "a directory";
    if (S_ISFIFO(mode))
        return "a FIFO";
    if (S_ISSOCK(mode))
        return "a socket";
    if (S_ISCHR(mode))
        return "a character device";
    if (S_ISBLK(mode))
        return "a block device";
    return "not a regular file";
}

/* Reads take regular files only (a FIFO or a device could block or never end); writes also
 * take devices (/dev/urandom) but never a FIFO or a socket, whose reader could stall us. */
static int file_type_allowed(mode_t mode, int writing)
{
    return S_ISREG(mode) || (writing && (S_ISCHR(mode) || S_ISBLK(mode)));
}

/* Open a guest file for READ_FILE or WRITE_FILE without ever blocking the agent's loop: a
 * file of the wrong type is refused before it is opened (opening a device can have effects),
 * O_NONBLOCK keeps open(2) of a FIFO from waiting for its other end should one be renamed
 * into place meanwhile, and the opened file's type is checked again. Returns the fd
 * (blocking again), or -1 with the error sent. */
static int open_guest_file(uint32_t stream, const char *path, int flags, mode_t mode, int writing)
{
    const char *verb = writing ? "write" : "read";
    struct stat st;
    int fd = -1;
    if (stat(path, &st) == 0 && !file_type_allowed(st.st_mode, writing))
        goto refuse;
    fd = open(path, flags | O_CLOEXEC | O_NONBLOCK, mode);
    if (fd < 0 || fstat(fd, &st) < 0) {
        send_error(stream, SM_E_IO_FAILED, "%s %s: %s", verb, path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return -1;
    }
    if (!file_type_allowed(st.st_mode, writing))
        goto refuse;
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    return fd;

refuse:
    send_error(stream, SM_E_IO_FAILED, "%s %s: %s, not a regular file", verb, path,
               file_kind(st.st_mode));
    if (fd >= 0)
        close(fd);
    return -1;
}

static void handle_write_file(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t flags, mode;
    char *path = NULL;
    if (!claim_ok(h))
        return;
    if (!sm_get_u32(c, &flags) || flags > 1 || !sm_get_u32(c, &mode) || mode > 07777
        || !(path = get_path(c))) {
        send_error(h->stream, SM_E_BAD_PAYLOAD, "malformed WRITE_FILE payload");
        free(path);
        return;
    }
    const uint8_t *data = c->data + c->pos;
    size_t len = c->len - c->pos;
    int fd = open_guest_file(h->stream, path,
                             O_WRONLY | O_CREAT | ((flags & 1) ? O_APPEND : O_TRUNC), mode, 1);
    if (fd < 0) {
        free(path);
        return;
    }
    if (write_all(fd, data, len) < 0) {
        send_error(h->stream, SM_E_IO_FAILED, "write %s: %s", path, strerror(errno));
        close(fd);
    } else if (close(fd) < 0) {
        send_error(h->stream, SM_E_IO_FAILED, "write %s: %s", path, strerror(errno));
    } else {
        send_ok(h->stream, len);
    }
    free(path);
}

static void handle_read_file(const struct sm_header *h, struct sm_cursor *c)
{
    char *path = NULL;
    if (!claim_ok(h))
        return;
    if (!(path = get_path(c)) || !sm_at_end(c)) {
        send_error(h->stream, SM_E_BAD_PAYLOAD, "malformed READ_FILE payload");
        free(path);
        return;
    }
    int fd = open_guest_file(h->stream, path, O_RDONLY, 0, 0);
    if (fd < 0) {
        free(path);
        return;
    }
    struct stream *s = new_stream(h->stream, STREAM_READ_FILE);
    if (!s) {
        send_error(h->stream, SM_E_TOO_MANY, "more than %d open streams", SM_MAX_STREAMS);
        close(fd);
    } else {
        s->file_fd = fd;
    }
    free(path);
}

/* End the VM cleanly: stop every process, unmount volumes so their journals are clean (a
 * read-only mount of an unclean ext4 would fail next time), then reboot, which the engines
 * treat as "VM ended". */
static void power_off(void)
{
    log_line("poweroff requested by the host");
    forget_streams();
    kill(-1, SIGKILL);
    sync();
    char targets[32][256];
    int n = 0;
    FILE *mounts = fopen("/proc/mounts", "r");
    char line[1024];
    while (mounts && n < 32 && fgets(line, sizeof line, mounts)) {
        char dev[256], dir[256], type[64];
        if (sscanf(line, "%255s %255s %63s", dev, dir, type) == 3
            && (strcmp(type, "ext4") == 0 || strcmp(type, "virtiofs") == 0))
            snprintf(targets[n++], sizeof targets[0], "%s", dir);
    }
    if (mounts)
        fclose(mounts);
    while (n-- > 0)
        if (umount2(targets[n], 0) != 0)
            mount(NULL, targets[n], NULL, MS_REMOUNT | MS_RDONLY, NULL);
    sync();
    reboot(RB_AUTOBOOT);
}

static void send_message(uint32_t stream, uint32_t code, const struct sm_text *message)
{
    send_error(stream, code, "%.*s", (int)message->len, message->data);
}

static struct sm_agent agent = {
    .software = AGENT_SOFTWARE,
    .send_frame = send_frame,
    .send_error = send_message,
    .forget_streams = forget_streams,
    .power_off = power_off,
    .exec = handle_exec,
    .stdin_data = handle_stdin,
    .signal = handle_signal,
    .credit = handle_credit,
    .write_file = handle_write_file,
    .read_file = handle_read_file,
    .abandon = handle_abandon,
};

/* ----------------------------------------------------------------------------------- */
/* Input: a buffer of received bytes, parsed into frames with resynchronisation. */

static uint8_t *in_buf;
static size_t in_len;

static void parse_input(void)
{
    size_t used = sm_agent_serve(&agent, in_buf, in_len);
    memmove(in_buf, in_buf + used, in_len - used);
    in_len -= used;
}

/* ----------------------------------------------------------------------------------- */
/* Output and child bookkeeping. */

/* Read one chunk from fd into a frame of `type`, within the stream's credit. */
static void pump_output(struct stream *s, int *fd, uint8_t type)
{
    size_t room = s->out_credit < (int64_t)SM_MAX_CHUNK_BYTES ? (size_t)s->out_credit
                                                             : SM_MAX_CHUNK_BYTES;
    if (room == 0)
        return;
    ssize_t n = read(*fd, out_frame + SM_HEADER_BYTES, room);
    if (n < 0 && (errno == EINTR || errno == EAGAIN))
        return;
    if (n <= 0) {
        close_fd(fd);
        return;
    }
    sm_encode_header(out_frame, type, s->id, (uint32_t)n);
    if (conn_fd >= 0)
        write_all(conn_fd, out_frame, SM_HEADER_BYTES + (size_t)n);
    s->out_credit -= n;
    s->last_output_ms = now_ms();
    if (type == SM_FILE_DATA)
        s->file_sent += (uint64_t)n;
    if (type != SM_FILE_DATA) {
        size_t *left = &s->left_at_exit[type == SM_STDERR];
        *left = *left > (size_t)n ? *left - (size_t)n : 0;
    }
}

/* Bytes waiting in a pipe (0 when closed or unknown). */
static size_t pipe_pending(int fd)
{
    int n = 0;
    if (fd < 0 || ioctl(fd, FIONREAD, &n) < 0 || n < 0)
        return 0;
    return (size_t)n;
}

static void pump_stdin(struct stream *s)
{
    if (s->stdin_len) {
        ssize_t n = write(s->stdin_fd, s->stdin_buf, s->stdin_len);
        if (n > 0) {
            memmove(s->stdin_buf, s->stdin_buf + n, s->stdin_len - (size_t)n);
            s->stdin_len -= (size_t)n;
            send_u32(SM_CREDIT, s->id, (uint32_t)n);
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            /* EPIPE: the command closed its stdin; return the credit of what we drop. */
            send_u32(SM_CREDIT, s->id, (uint32_t)s->stdin_len);
            s->stdin_len = 0;
            close_fd(&s->stdin_fd);
        }
    }
    if (s->stdin_len == 0 && s->stdin_close_pending)
        close_fd(&s->stdin_fd);
}

static void reap_children(int sfd)
{
    struct signalfd_siginfo info;
    while (read(sfd, &info, sizeof info) == (ssize_t)sizeof info)
        ;
    int status;
    pid_t pid;
    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (int i = 0; i < SM_MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->kind == STREAM_EXEC && s->pid == pid && !s->exited) {
                s->exited = 1;
                s->exited_at_ms = now_ms();
                /* Everything the command wrote is in its pipes by now: that much is
                 * forwarded before the EXIT, whatever its escaped children do. */
                s->left_at_exit[0] = pipe_pending(s->stdout_fd);
                s->left_at_exit[1] = pipe_pending(s->stderr_fd);
                s->exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
                s->exit_signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
            }
        }
    }
}

/* Send the last frame of streams that are done, and free them. */
static void finish_streams(void)
{
    long long now = now_ms();
    for (int i = 0; i < SM_MAX_STREAMS; i++) {
        struct stream *s = &streams[i];
        if (s->kind == STREAM_EXEC && s->exited) {
            /* Pipes still open after the exit are held by children that escaped the command
             * (`server &`, `setsid ...`). What the command itself wrote goes first, at the
             * host's pace; then the pipes are cut once quiet, or after EXIT_DRAIN_MAX_MS if
             * the children keep writing. After the host's SIGKILL nothing is waited for:
             * the host is waiting for this EXIT to return on time. */
            int pipes_open = s->stdout_fd >= 0 || s->stderr_fd >= 0;
            if (pipes_open && !s->killed) {
                int drained = (s->stdout_fd < 0 || s->left_at_exit[0] == 0)
                              && (s->stderr_fd < 0 || s->left_at_exit[1] == 0);
                int quiet = now - s->last_output_ms >= EXIT_DRAIN_QUIET_MS
                            && now - s->exited_at_ms >= EXIT_DRAIN_QUIET_MS;
                if (!drained || !(quiet || now - s->exited_at_ms >= EXIT_DRAIN_MAX_MS))
                    continue;
            }
            struct sm_builder b = { 0 };
            if (sm_put_u32(&b, (uint32_t)s->exit_code) && sm_put_u32(&b, (uint32_t)s->exit_signal))
                send_frame(SM_EXIT, s->id, b.data, b.len);
            sm_builder_free(&b);
            free_stream(s);
        } else if (s->kind == STREAM_READ_FILE && s->file_fd < 0) {
            send_ok(s->id, s->file_sent);
            free_stream(s);
        }
    }
}

/* ----------------------------------------------------------------------------------- */
/* Transport. */

static int open_port(const char *name)
{
    for (int attempt = 0; attempt < 200; attempt++) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[300], got[128] = { 0 };
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(path, O_RDONLY);
            if (fd < 0)
                continue;
            ssize_t n = read(fd, got, sizeof got - 1);
            close(fd);
            while (n > 0 && (got[n - 1] == '\n'))
                got[--n] = 0;
            if (strcmp(got, name) == 0) {
                snprintf(path, sizeof path, "/dev/%s", e->d_name);
                closedir(d);
                return open(path, O_RDWR | O_CLOEXEC | O_NONBLOCK);
            }
        }
        if (d)
            closedir(d);
        usleep(50 * 1000);
    }
    errno = ENOENT;
    return -1;
}

static void end_session(const char *why)
{
    if (agent.session_ready)
        log_line("%s; session reset", why);
    sm_agent_end_session(&agent);
    in_len = 0;
}

/* Ends the session and closes its vsock connection; the listener stays. A connection
 * dies by the host's hang-up, or by a vsock transport reset (a snapshot of this guest was
 * restored: Linux resets every connected socket, ECONNRESET, but not the listener). */
static void drop_connection(const char *why)
{
    end_session(why);
    close_fd(&conn_fd);
}

/* A host connected; returns 1 when conn_fd is a new connection. The newest connection is
 * the host's: a host connects anew only after giving up its old connection, whose hang-up
 * (or reset) may not have reached us yet, so the older one is dropped rather than kept while
 * the new host waits for a HELLO forever. */
static int accept_host(void)
{
    int accepted = 0;
    for (;;) {
        int fd = accept4(listen_fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
        if (fd < 0) {
            /* EAGAIN: none left. A connection reset before we took it (ECONNABORTED and
             * the like) is dropped by the kernel alone: keep listening. */
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            return accepted;
        }
        if (conn_fd >= 0)
            drop_connection("a new host connection replaced the old one");
        conn_fd = fd;
        accepted = 1;
    }
}

static int open_vsock_listener(unsigned port)
{
    struct sockaddr_vm_compat addr = { 0 };
    addr.svm_family = AF_VSOCK_COMPAT;
    addr.svm_port = port;
    addr.svm_cid = VMADDR_CID_ANY_COMPAT;
    /* Non-blocking: the listener sits in the poll set beside the connection. */
    int fd = socket(AF_VSOCK_COMPAT, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 4) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

int main(int argc, char **argv)
{
    const char *transport = argc > 1 ? argv[1] : "port:sm.agent";
    int is_port = strncmp(transport, "port:", 5) == 0;

    in_buf = malloc(SM_HEADER_BYTES + SM_MAX_PAYLOAD_BYTES);
    out_frame = malloc(SM_HEADER_BYTES + SM_MAX_CHUNK_BYTES);
    if (!in_buf || !out_frame) {
        log_line("out of memory");
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int sfd = signalfd(-1, &mask, SFD_NONBLOCK | SFD_CLOEXEC);

    if (is_port) {
        conn_fd = open_port(transport + 5);
        if (conn_fd < 0) {
            log_line("FATAL: virtio-serial port %s not found: %s", transport + 5, strerror(errno));
            return 1;
        }
    } else if (strncmp(transport, "vsock:", 6) == 0) {
        listen_fd = open_vsock_listener((unsigned)atoi(transport + 6));
        if (listen_fd < 0) {
            log_line("FATAL: cannot listen on vsock port %s: %s", transport + 6, strerror(errno));
            return 1;
        }
    } else {
        log_line("FATAL: unknown transport '%s' (want port:NAME or vsock:PORT)", transport);
        return 1;
    }
    log_line("serving on %s", transport);

    /* pfds[0]: the connection (-1, ignored by poll, while there is none); [1]: SIGCHLD;
     * [2]: the vsock listener (-1 on a port); then the commands' pipes. */
    struct pollfd pfds[3 + 3 * SM_MAX_STREAMS];
    struct { struct stream *s; int which; } owners[3 + 3 * SM_MAX_STREAMS];
    for (;;) {
        int n = 0, timeout = -1;
        pfds[n] = (struct pollfd){ .fd = conn_fd, .events = POLLIN };
        owners[n++].s = NULL;
        pfds[n] = (struct pollfd){ .fd = sfd, .events = POLLIN };
        owners[n++].s = NULL;
        pfds[n] = (struct pollfd){ .fd = listen_fd, .events = POLLIN };
        owners[n++].s = NULL;
        for (int i = 0; i < SM_MAX_STREAMS; i++) {
            struct stream *s = &streams[i];
            if (s->kind == STREAM_READ_FILE && s->out_credit > 0)
                timeout = 0;  /* regular files are always readable */
            if (s->kind != STREAM_EXEC)
                continue;
            if (s->exited && (s->stdout_fd >= 0 || s->stderr_fd >= 0))
                timeout = timeout == 0 ? 0 : EXIT_DRAIN_QUIET_MS / 2;
            int fds[3] = { s->stdout_fd, s->stderr_fd, s->stdin_fd };
            short ev[3] = { POLLIN, POLLIN, POLLOUT };
            for (int k = 0; k < 3; k++) {
                if (fds[k] < 0 || (k < 2 && s->out_credit <= 0)
                    || (k == 2 && s->stdin_len == 0 && !s->stdin_close_pending))
                    continue;
                pfds[n] = (struct pollfd){ .fd = fds[k], .events = ev[k] };
                owners[n].s = s;
                owners[n++].which = k;
            }
        }
        if (poll(pfds, (nfds_t)n, timeout) < 0 && errno != EINTR)
            continue;

        if (pfds[1].revents)
            reap_children(sfd);
        int replaced = pfds[2].revents && accept_host();
        for (int i = 3; i < n; i++) {
            struct stream *s = owners[i].s;
            if (!pfds[i].revents || s->kind != STREAM_EXEC)
                continue;
            if (owners[i].which == 0 && s->stdout_fd >= 0)
                pump_output(s, &s->stdout_fd, SM_STDOUT);
            else if (owners[i].which == 1 && s->stderr_fd >= 0)
                pump_output(s, &s->stderr_fd, SM_STDERR);
            else if (owners[i].which == 2 && s->stdin_fd >= 0)
                pump_stdin(s);
        }
        for (int i = 0; i < SM_MAX_STREAMS; i++)
            if (streams[i].kind == STREAM_READ_FILE && streams[i].file_fd >= 0)
                pump_output(&streams[i], &streams[i].file_fd, SM_FILE_DATA);
        for (int i = 0; i < SM_MAX_STREAMS; i++)
            if (streams[i].kind == STREAM_EXEC && streams[i].stdin_close_pending
                && streams[i].stdin_len == 0)
                close_fd(&streams[i].stdin_fd);

        if (conn_fd < 0 || replaced) {
            /* No connection, or a new one: pfds[0] told of the old one (perhaps the same
             * fd number); the new one is polled from the next round on. */
        } else if (pfds[0].revents & POLLIN) {
            /* A full buffer always holds a complete frame or a bad header, so it drains. */
            ssize_t got = read(conn_fd, in_buf + in_len, SM_HEADER_BYTES + SM_MAX_PAYLOAD_BYTES - in_len);
            if (got > 0) {
                in_len += (size_t)got;
                parse_input();
            } else if (got == 0 || (errno != EINTR && errno != EAGAIN)) {
                goto disconnected;
            }
        } else if (pfds[0].revents & (POLLHUP | POLLERR)) {
            goto disconnected;
        }
        finish_streams();
        continue;

    disconnected:
        /* The host went away: its commands die with the session. A virtio-serial port
         * stays open and reports HUP until the host reconnects; a vsock connection is
         * closed (only it: the listener goes on) and the next one accepted. */
        if (is_port) {
            end_session("host disconnected");
            usleep(20 * 1000);
        } else {
            drop_connection("host disconnected");
        }
    }
}

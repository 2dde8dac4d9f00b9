/* agent probe: the guest agent protocol (native/guest/PROTOCOL.md, version 1) served by a
 * freestanding guest, so that the whole host stack (Image -> Vm -> NativeInstance -> vsock
 * mux -> AgentClient -> %%vm) runs end to end on the native core where Linux cannot boot.
 *  - listens on the vsock port of sm.agent=vsock:<port> (default 1024) and serves one
 *    connection at a time: the next waits in the backlog until this one is closed or reset;
 *  - frames, CRC and resynchronisation are the real agent's (../agent/protocol.c), and every
 *    frame gets the answer the real agent gives, except that commands are built-ins
 *    (agent_shell.h) and files live in a small table (agent_files.h);
 *  - EXEC: STARTED, then each command's output as STDOUT/STDERR, then EXIT with the last
 *    command's status. A command runs only once its stream has credit for all it can write,
 *    so a stream without credit waits for CREDIT and output is never held back. STDIN is
 *    taken (its credit returned, its bytes dropped: built-ins read none). SIGNAL is taken and
 *    changes nothing: a built-in cannot be interrupted, and EXIT says how it ended;
 *  - POWEROFF resets through the i8042, which the engines take as the end of the VM;
 * "supermachine-init: ready" (engines/base.py GUEST_READY_LINE) goes to COM1 once it listens. */
#include "probe.h"
#include "probe_vsock.h"
#include "dispatch.h"
#include "protocol.h"
#include "agent_files.h"
#include "agent_shell.h"

#define DEFAULT_AGENT_PORT 1024
#define AGENT_SOFTWARE "supermachine-probe-agent 0.1"
#define IN_BUF_BYTES (SM_HEADER_BYTES + SM_MAX_PAYLOAD_BYTES)
#define MAX_PATH_BYTES 4096      /* the real agent's limit: longer paths are malformed */
#define MAX_STRV_COUNT 4096      /* the real agent's limit on argv and env entries */
#define SMALL_PAYLOAD_BYTES 64
#define FIRST_PID 2              /* the probe has no processes: commands are numbered */
#define MAX_CREDIT_BYTES (1ll << 40)

/* The host returns credit in half windows: a stream waiting for this much always gets it. */
#define COMMAND_OUTPUT_MAX_BYTES (SHELL_STDOUT_BYTES + SHELL_STDERR_BYTES)
_Static_assert(COMMAND_OUTPUT_MAX_BYTES <= SM_INITIAL_WINDOW_BYTES / 2, "credit for a command");
_Static_assert(SHELL_STDOUT_BYTES <= SM_MAX_CHUNK_BYTES && SHELL_STDERR_BYTES <= SM_MAX_CHUNK_BYTES,
               "a command's output goes in one frame per stream");
/* A READ_FILE is answered at once: one FILE_DATA always fits in a fresh stream's credit. */
_Static_assert(FILE_MAX_BYTES <= SM_INITIAL_WINDOW_BYTES && FILE_MAX_BYTES <= SM_MAX_CHUNK_BYTES,
               "a file in one frame");

/* An EXEC stream (WRITE_FILE and READ_FILE are answered at once and keep no stream). */
struct stream {
    int open;
    uint32_t id;
    int argv_mode;          /* text: argc NUL-terminated words; else one script */
    int argc;
    int argv_done;
    char text[SHELL_SCRIPT_MAX_BYTES];
    uint32_t text_len;
    uint32_t pos;           /* the script's next command */
    int status;             /* of the last command */
    int stdin_open;         /* EXEC flags bit 0, until an empty STDIN closes it */
    int64_t out_credit;
};

static struct stream streams[SM_MAX_STREAMS];
static struct stream no_slot;  /* decodes an EXEC that finds the table full */
static uint32_t agent_port = DEFAULT_AGENT_PORT;
static int conn = -1;
static int conn_lost;          /* a send found the connection gone */
static uint8_t *in_buf;
static size_t in_len;
static struct shell_output output;
static uint32_t next_pid = FIRST_PID;
static struct sm_text message; /* the next ERROR's, composed piece by piece */

static void log_line(const char *s)
{
    put_str("probe-agent: ");
    put_line(s);
}

/* ---- sending ----------------------------------------------------------------------------- */

/* Everything, waiting for the host's credit; nothing once the connection is gone. */
static void send_bytes(const uint8_t *p, size_t n)
{
    if (!conn_lost && vsock_send_all(conn, p, n))
        conn_lost = 1;
}

static void send_frame(uint8_t type, uint32_t stream, const uint8_t *payload, size_t len)
{
    uint8_t header[SM_HEADER_BYTES];
    sm_encode_header(header, type, stream, (uint32_t)len);
    send_bytes(header, sizeof(header));
    send_bytes(payload, len);
}

static void send_u32(uint8_t type, uint32_t stream, uint32_t value)
{
    uint8_t buf[SMALL_PAYLOAD_BYTES];
    struct sm_builder b = { buf, 0, sizeof(buf), 0 };
    sm_put_u32(&b, value);
    send_frame(type, stream, b.data, b.len);
}

static void send_ok(uint32_t stream, uint64_t value)
{
    uint8_t buf[SMALL_PAYLOAD_BYTES];
    struct sm_builder b = { buf, 0, sizeof(buf), 0 };
    sm_put_u64(&b, value);
    send_frame(SM_OK, stream, b.data, b.len);
}

static void send_message(uint32_t stream, uint32_t code, const struct sm_text *text)
{
    uint8_t buf[SM_TEXT_MAX_BYTES + SMALL_PAYLOAD_BYTES];
    struct sm_builder b = { buf, 0, sizeof(buf), 0 };
    sm_put_u32(&b, code);
    sm_put_str(&b, text->data, text->len);
    send_frame(SM_ERROR, stream, b.data, b.len);
}

/* Sends the ERROR composed in `message`, which starts empty again. */
static void send_error(uint32_t stream, uint32_t code)
{
    send_message(stream, code, &message);
    message.len = 0;
}

static void error_text(uint32_t stream, uint32_t code, const char *text)
{
    sm_text_str(&message, text);
    send_error(stream, code);
}

/* ---- streams ----------------------------------------------------------------------------- */

static struct stream *find_stream(uint32_t id)
{
    for (int i = 0; id && i < SM_MAX_STREAMS; i++)
        if (streams[i].open && streams[i].id == id)
            return &streams[i];
    return 0;
}

static struct stream *free_slot(void)
{
    for (int i = 0; i < SM_MAX_STREAMS; i++)
        if (!streams[i].open)
            return &streams[i];
    return 0;
}

/* A new HELLO or a lost connection ends the session and forgets its streams. */
static void forget_streams(void)
{
    for (int i = 0; i < SM_MAX_STREAMS; i++)
        streams[i].open = 0;
}

/* Is h's stream id free for a new request? Answers when it is not. */
static int claim_ok(const struct sm_header *h)
{
    if (h->stream == 0) {
        sm_text_str(&message, "frame type ");
        sm_text_type(&message, h->type);
        sm_text_str(&message, " needs a non-zero stream id");
        send_error(0, SM_E_BAD_STREAM);
        return 0;
    }
    if (find_stream(h->stream)) {
        sm_text_str(&message, "stream ");
        sm_text_dec(&message, h->stream);
        sm_text_str(&message, " is already in use");
        send_error(h->stream, SM_E_BAD_STREAM);
        return 0;
    }
    return 1;
}

static void too_many(uint32_t stream)
{
    sm_text_str(&message, "more than ");
    sm_text_dec(&message, SM_MAX_STREAMS);
    sm_text_str(&message, " open streams");
    send_error(stream, SM_E_TOO_MANY);
}

static int has_nul(const uint8_t *p, uint32_t n)
{
    for (uint32_t i = 0; i < n; i++)
        if (!p[i])
            return 1;
    return 0;
}

/* A path: 1 … MAX_PATH_BYTES bytes without NUL. */
static int get_path(struct sm_cursor *c, const uint8_t **path, uint32_t *len)
{
    return sm_get_str(c, path, len) && *len > 0 && *len <= MAX_PATH_BYTES && !has_nul(*path, *len);
}

/* ---- commands ---------------------------------------------------------------------------- */

/* The next command's status, or -1 when the stream has run them all. */
static int run_next_command(struct stream *s)
{
    if (!s->argv_mode)
        return shell_run_next(s->text, s->text_len, &s->pos, &output);
    if (s->argv_done)
        return -1;
    const char *argv[SHELL_MAX_WORDS];
    const char *p = s->text;
    for (int i = 0; i < s->argc; i++, p += strlen(p) + 1)
        argv[i] = p;
    s->argv_done = 1;
    return shell_run_argv(s->argc, argv, &output);
}

/* Runs commands while the stream has credit for all one can write, sending their output;
 * EXIT after the last. */
static void run_stream(struct stream *s)
{
    while (!conn_lost && s->out_credit >= (int64_t)COMMAND_OUTPUT_MAX_BYTES) {
        int status = run_next_command(s);
        if (status < 0) {
            uint8_t buf[SMALL_PAYLOAD_BYTES];
            struct sm_builder b = { buf, 0, sizeof(buf), 0 };
            sm_put_u32(&b, (uint32_t)s->status);
            sm_put_u32(&b, 0);
            send_frame(SM_EXIT, s->id, b.data, b.len);
            s->open = 0;
            return;
        }
        s->status = status;
        if (output.out_len)
            send_frame(SM_STDOUT, s->id, output.out, output.out_len);
        if (output.err_len)
            send_frame(SM_STDERR, s->id, output.err, output.err_len);
        s->out_credit -= output.out_len + output.err_len;
    }
}

/* Decodes EXEC into s; 0 if malformed. *too_big: the command does not fit in s->text;
 * *argv0 (*argv0_len bytes) for the message that says so. */
static int decode_exec(struct sm_cursor *c, struct stream *s, int *too_big, const uint8_t **argv0,
                       uint32_t *argv0_len)
{
    uint32_t mode, argc, envc, flags, len;
    const uint8_t *p;
    if (!sm_get_u32(c, &mode) || mode > 1 || !sm_get_u32(c, &argc) || argc == 0 ||
        argc > MAX_STRV_COUNT || (mode == 1 && argc != 1))
        return 0;
    s->argv_mode = mode == 0;
    s->argc = (int)argc;
    s->text_len = 0;
    *too_big = argc > SHELL_MAX_WORDS;
    for (uint32_t i = 0; i < argc; i++) {
        if (!sm_get_str(c, &p, &len) || has_nul(p, len))
            return 0;
        if (i == 0) {
            *argv0 = mode == 0 ? p : (const uint8_t *)"/bin/sh";
            *argv0_len = mode == 0 ? len : (uint32_t)strlen("/bin/sh");
        }
        uint32_t need = len + (s->argv_mode ? 1 : 0);
        if (need > SHELL_SCRIPT_MAX_BYTES - s->text_len) {
            *too_big = 1;
            continue;
        }
        memcpy(s->text + s->text_len, p, len);
        s->text_len += len;
        if (s->argv_mode)
            s->text[s->text_len++] = 0;
    }
    if (!sm_get_u32(c, &envc) || envc > MAX_STRV_COUNT)
        return 0;
    for (uint32_t i = 0; i < envc; i++)  /* the environment means nothing to built-ins */
        if (!sm_get_str(c, &p, &len) || has_nul(p, len))
            return 0;
    if (!sm_get_str(c, &p, &len) || has_nul(p, len))  /* cwd: built-ins use no directory */
        return 0;
    if (!sm_get_u32(c, &flags) || flags > 1 || !sm_at_end(c))
        return 0;
    s->stdin_open = flags & 1;
    return 1;
}

/* `sh -c SCRIPT [ARG0 ARGS…]` is the script itself (it has no $0 to expand). */
static void unwrap_shell(struct stream *s)
{
    const char *sh = s->text, *dash_c = sh + strlen(sh) + 1, *name = sh;
    for (const char *q = sh; *q; q++)
        if (*q == '/')
            name = q + 1;
    if (s->argc < 3 || strlen(name) != 2 || memcmp(name, "sh", 2) != 0 || strlen(dash_c) != 2 ||
        memcmp(dash_c, "-c", 2) != 0)
        return;
    const char *script = dash_c + 3;
    uint32_t len = (uint32_t)strlen(script);
    memmove(s->text, script, len);
    s->text_len = len;
    s->argv_mode = 0;
}

static void handle_exec(const struct sm_header *h, struct sm_cursor *c)
{
    if (!claim_ok(h))
        return;
    struct stream *s = free_slot();
    int too_big;
    const uint8_t *argv0;
    uint32_t argv0_len;
    /* Decoded even when the table is full: a malformed payload is reported first. */
    if (!decode_exec(c, s ? s : &no_slot, &too_big, &argv0, &argv0_len)) {
        error_text(h->stream, SM_E_BAD_PAYLOAD, "malformed EXEC payload");
        return;
    }
    if (!s) {
        too_many(h->stream);
        return;
    }
    if (too_big) {
        sm_text_str(&message, "exec ");
        sm_text_bytes(&message, argv0, argv0_len);
        sm_text_str(&message, ": Argument list too long");
        send_error(h->stream, SM_E_EXEC_FAILED);
        return;
    }
    if (s->argv_mode)
        unwrap_shell(s);
    s->open = 1;
    s->id = h->stream;
    s->argv_done = 0;
    s->pos = 0;
    s->status = 0;
    s->out_credit = SM_INITIAL_WINDOW_BYTES;
    send_u32(SM_STARTED, h->stream, next_pid++);
    run_stream(s);
}

static void handle_stdin(const struct sm_header *h, struct sm_cursor *c)
{
    (void)c; /* the bytes: built-ins read no stdin */
    struct stream *s = find_stream(h->stream);
    if (!s || !s->stdin_open) {
        sm_text_str(&message, "stream ");
        sm_text_dec(&message, h->stream);
        sm_text_str(&message, " takes no stdin");
        send_error(h->stream, SM_E_BAD_STREAM);
        return;
    }
    if (h->length == 0) {
        s->stdin_open = 0;
        return;
    }
    if (h->length > SM_INITIAL_WINDOW_BYTES) {
        error_text(h->stream, SM_E_FLOW, "stdin beyond the granted credit");
        return;
    }
    send_u32(SM_CREDIT, h->stream, h->length);
}

static void handle_signal(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t signo;
    if (!find_stream(h->stream)) {
        sm_text_str(&message, "no command runs on stream ");
        sm_text_dec(&message, h->stream);
        send_error(h->stream, SM_E_BAD_STREAM);
        return;
    }
    if (!sm_get_u32(c, &signo) || !sm_at_end(c) || signo < 1 || signo > 64)
        error_text(h->stream, SM_E_BAD_PAYLOAD, "SIGNAL needs one u32 from 1 to 64");
}

static void handle_credit(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t bytes;
    struct stream *s = find_stream(h->stream);
    if (!s) {
        sm_text_str(&message, "no stream ");
        sm_text_dec(&message, h->stream);
        sm_text_str(&message, " to credit");
        send_error(h->stream, SM_E_BAD_STREAM);
        return;
    }
    if (!sm_get_u32(c, &bytes) || !sm_at_end(c)) {
        error_text(h->stream, SM_E_BAD_PAYLOAD, "CREDIT needs one u32");
        return;
    }
    s->out_credit += bytes;
    if (s->out_credit > MAX_CREDIT_BYTES)
        s->out_credit = MAX_CREDIT_BYTES;
    run_stream(s);
}

static void io_failed(uint32_t stream, const char *op, const uint8_t *path, uint32_t len,
                      enum files_result r)
{
    sm_text_str(&message, op);
    sm_text_str(&message, " ");
    sm_text_bytes(&message, path, len);
    sm_text_str(&message, ": ");
    sm_text_str(&message, files_strerror(r));
    send_error(stream, SM_E_IO_FAILED);
}

static void handle_write_file(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t flags, mode, len;
    const uint8_t *path;
    if (!claim_ok(h))
        return;
    /* mode: the file table keeps no permissions */
    if (!sm_get_u32(c, &flags) || flags > 1 || !sm_get_u32(c, &mode) || mode > 07777 ||
        !get_path(c, &path, &len)) {
        error_text(h->stream, SM_E_BAD_PAYLOAD, "malformed WRITE_FILE payload");
        return;
    }
    uint32_t data_len = (uint32_t)(c->len - c->pos);
    enum files_result r = files_write((const char *)path, len, c->data + c->pos, data_len, flags & 1);
    if (r != FILES_OK)
        io_failed(h->stream, "write", path, len, r);
    else
        send_ok(h->stream, data_len);
}

static void handle_read_file(const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t len, data_len;
    const uint8_t *path, *data;
    if (!claim_ok(h))
        return;
    if (!get_path(c, &path, &len) || !sm_at_end(c)) {
        error_text(h->stream, SM_E_BAD_PAYLOAD, "malformed READ_FILE payload");
        return;
    }
    enum files_result r = files_read((const char *)path, len, &data, &data_len);
    if (r != FILES_OK) {
        io_failed(h->stream, "read", path, len, r);
        return;
    }
    if (!free_slot()) {
        too_many(h->stream);
        return;
    }
    if (data_len)
        send_frame(SM_FILE_DATA, h->stream, data, data_len);
    send_ok(h->stream, data_len);
}

static void power_off(void)
{
    log_line("poweroff requested by the host");
    guest_reset();
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
};

/* ---- the connection ---------------------------------------------------------------------- */

static void parse_input(void)
{
    size_t used = sm_agent_serve(&agent, in_buf, in_len);
    memmove(in_buf, in_buf + used, in_len - used);
    in_len -= used;
}

/* Reads and answers everything the host has sent; nonzero if there was anything. A full
 * buffer always holds a whole frame or a bad header, so parsing always makes room. */
static int serve_connection(void)
{
    int progress = 0;
    size_t n;
    while (!conn_lost && (n = vsock_recv(conn, in_buf + in_len, IN_BUF_BYTES - in_len))) {
        in_len += n;
        progress = 1;
        parse_input();
    }
    return progress;
}

static void accept_connection(void)
{
    in_len = 0;
    conn_lost = 0;
    put_str("probe-agent: serving host port ");
    put_dec(vsock_peer_port(conn));
    put_char('\n');
}

/* The host went away (or a snapshot restore reset the transport): its session ends. */
static void end_connection(void)
{
    if (agent.session_ready)
        log_line("host disconnected; session reset");
    sm_agent_end_session(&agent);
    vsock_close(conn);
    conn = -1;
}

/* ---- boot -------------------------------------------------------------------------------- */

int probe_main(void)
{
    char value[FILE_PATH_MAX_BYTES];
    if (cmdline_get("sm.agent", value, sizeof(value))) {
        if (memcmp(value, "vsock:", 6) != 0) {
            put_str("probe-agent: FATAL: transport ");
            put_str(value);
            put_line(" is not vsock:PORT");
            return 1;
        }
        agent_port = (uint32_t)parse_u64(value + 6);
    }
    if (!cmdline_get("sm.hostname", value, sizeof(value)))
        memcpy(value, "probe", sizeof("probe"));
    files_write(HOSTNAME_PATH, (uint32_t)strlen(HOSTNAME_PATH), (const uint8_t *)value,
                (uint32_t)strlen(value), 0);
    const char *error = vsock_init();
    if (error) {
        put_str("probe-agent: FATAL: vsock: ");
        put_line(error);
        return 1;
    }
    vsock_listen(agent_port);
    in_buf = alloc_pages_nozero((IN_BUF_BYTES + PROBE_PAGE_BYTES - 1) / PROBE_PAGE_BYTES);
    put_str("supermachine-init: ready, probe agent listening on vsock:");
    put_dec(agent_port);
    put_char('\n');
    for (;;) {
        int progress = vsock_poll();
        if (conn < 0 && (conn = vsock_accept(agent_port)) >= 0) {
            accept_connection();
            progress = 1;
        }
        if (conn >= 0) {
            progress |= serve_connection();
            if (conn_lost || vsock_state(conn) != VSOCK_ESTABLISHED) {
                end_connection();
                progress = 1;
            }
        }
        if (!progress)
            vsock_wait();
    }
}

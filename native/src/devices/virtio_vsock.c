/* virtio_vsock.c — hybrid vsock: virtio-vsock packets on one side, unix stream sockets on
 * the other. TX (guest -> host) runs on the vCPU that notified; RX (host -> guest) is
 * pumped from both the vCPU (after TX, on RX refills) and the event loop (socket events).
 * Everything runs under the transport lock. */
#define _GNU_SOURCE
#include "virtio_vsock.h"
#include "error_table.h"
#include "../event_loop.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define CONFIG_GUEST_CID_OFFSET 0
#define CONFIG_BYTES 8

static const char *const VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_COUNT] = {
    [SM_VSOCK_ERR_NONE] = "ok",
    [SM_VSOCK_ERR_QUEUE] = "Guest gave us a malformed queue",
    [SM_VSOCK_ERR_TX_HEADER_TOO_SHORT] = "Guest gave us a TX packet shorter than the 44-byte header",
    [SM_VSOCK_ERR_TX_LEN_BEYOND_BUFFER] = "Guest gave us a TX packet whose len exceeds its buffer",
    [SM_VSOCK_ERR_TX_BUFFER_WRITABLE] = "Guest gave us a device-writable TX buffer",
    [SM_VSOCK_ERR_RX_BUFFER_TOO_SMALL] = "Guest gave us an RX buffer without 44 writable bytes",
    [SM_VSOCK_ERR_EVENT_BUFFER_TOO_SMALL] = "Guest gave us an event buffer without 4 writable bytes",
};

const char *sm_vsock_error_message(int err)
{
    return sm_error_table_lookup(VSOCK_ERROR_MESSAGES, SM_VSOCK_ERR_COUNT, err, "unknown vsock error");
}

typedef struct __attribute__((packed)) vsock_header {
    uint64_t src_cid;
    uint64_t dst_cid;
    uint32_t src_port;
    uint32_t dst_port;
    uint32_t len;
    uint16_t type;
    uint16_t op;
    uint32_t flags;
    uint32_t buf_alloc;
    uint32_t fwd_cnt;
} vsock_header;

_Static_assert(sizeof(vsock_header) == SM_VSOCK_HEADER_BYTES, "virtio_vsock_hdr is 44 bytes");

typedef enum conn_state {
    CONN_FREE = 0,
    CONN_HOST_HANDSHAKE,       /* reading "CONNECT <port>\n" from the host */
    CONN_AWAIT_GUEST_RESPONSE, /* REQUEST sent (or to send) to the guest */
    CONN_ESTABLISHED,
} conn_state;

typedef struct vsock_conn {
    conn_state state;
    int fd;
    uint32_t local_port; /* host side port, as the guest sees it */
    uint32_t peer_port;  /* guest side port */
    char line[SM_VSOCK_CONNECT_LINE_MAX_BYTES];
    uint32_t line_len;
    /* credit */
    uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
    uint32_t fwd_cnt, last_fwd_cnt_sent;
    /* guest -> host bytes not yet accepted by the host socket */
    uint8_t *pending;
    uint32_t pending_len;
    /* control packets owed to the guest */
    int owe_request, owe_response, owe_rst, owe_credit_update, owe_shutdown;
    int host_eof, guest_shut_send, shut_wr_done;
    uint32_t epoll_mask;
    int registered; /* fd is in the event loop */
} vsock_conn;

struct sm_vsock {
    sm_virtio_mmio *transport;
    struct sm_event_loop *loop;
    char uds_path[108];
    uint64_t guest_cid;
    int listen_fd;
    uint32_t next_host_port;
    int rx_starved;
    int transport_reset_pending;  /* owed to the guest until it posts an event buffer */
    int transport_reset_unhandled; /* delivered; host CONNECTs wait until the guest handled it */
    vsock_conn conns[SM_VSOCK_MAX_CONNECTIONS];
    sm_vsock_counters counters;
};

static void rx_pump_locked(sm_vsock *v);

sm_vsock *sm_vsock_create(const char *uds_path, uint32_t guest_cid, char *err, size_t err_len)
{
    sm_vsock *v = calloc(1, sizeof(*v));
    if (!v) {
        snprintf(err, err_len, "out of memory for virtio-vsock");
        return NULL;
    }
    /* Leave room for "_<port>" in sun_path. */
    if (strlen(uds_path) + 12 >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
        snprintf(err, err_len, "virtio-vsock: socket path %s is too long for AF_UNIX", uds_path);
        free(v);
        return NULL;
    }
    snprintf(v->uds_path, sizeof(v->uds_path), "%s", uds_path);
    v->guest_cid = guest_cid;
    v->listen_fd = -1;
    v->next_host_port = SM_VSOCK_FIRST_HOST_PORT;
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++)
        v->conns[i].fd = -1;
    return v;
}

/* ---- connections --------------------------------------------------------------------- */

static vsock_conn *conn_alloc(sm_vsock *v)
{
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++) {
        vsock_conn *c = &v->conns[i];
        if (c->state == CONN_FREE) {
            uint8_t *pending = malloc(SM_VSOCK_CONN_BUF_BYTES);
            if (!pending)
                return NULL;
            memset(c, 0, sizeof(*c));
            c->fd = -1;
            c->pending = pending;
            v->counters.active_connections++;
            return c;
        }
    }
    v->counters.connections_table_full++;
    return NULL;
}

static void conn_free(sm_vsock *v, vsock_conn *c)
{
    if (c->state == CONN_FREE)
        return;
    if (c->fd >= 0) {
        if (c->registered)
            sm_event_loop_remove(v->loop, c->fd);
        close(c->fd);
    }
    free(c->pending);
    memset(c, 0, sizeof(*c));
    c->fd = -1;
    c->state = CONN_FREE;
    v->counters.active_connections--;
}

static vsock_conn *conn_by_fd(sm_vsock *v, int fd)
{
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++)
        if (v->conns[i].state != CONN_FREE && v->conns[i].fd == fd)
            return &v->conns[i];
    return NULL;
}

static vsock_conn *conn_by_ports(sm_vsock *v, uint32_t local_port, uint32_t peer_port)
{
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++) {
        vsock_conn *c = &v->conns[i];
        if (c->state >= CONN_AWAIT_GUEST_RESPONSE && c->local_port == local_port &&
            c->peer_port == peer_port)
            return c;
    }
    return NULL;
}

static uint32_t peer_credit(const vsock_conn *c)
{
    uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
    return in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
}

/* Which socket events this connection wants now. */
static void update_interest(sm_vsock *v, vsock_conn *c)
{
    if (c->fd < 0 || !c->registered)
        return;
    if (c->host_eof && !c->pending_len) {
        /* A hung-up socket reports EPOLLHUP whatever the mask: leave the loop for good;
         * the fd stays open until the guest acknowledges with RST. */
        sm_event_loop_remove(v->loop, c->fd);
        c->registered = 0;
        return;
    }
    uint32_t mask = 0;
    if (c->state == CONN_HOST_HANDSHAKE)
        mask |= EPOLLIN;
    if (c->state == CONN_ESTABLISHED && !c->host_eof && !v->rx_starved && peer_credit(c) > 0)
        mask |= EPOLLIN;
    if (c->pending_len)
        mask |= EPOLLOUT;
    if (mask != c->epoll_mask) {
        sm_event_loop_modify(v->loop, c->fd, mask);
        c->epoll_mask = mask;
    }
}

static void update_all_interest(sm_vsock *v)
{
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++)
        if (v->conns[i].state != CONN_FREE)
            update_interest(v, &v->conns[i]);
}

/* Reset a connection: tell the guest (if it knows it) and drop the host side. */
static void conn_reset(sm_vsock *v, vsock_conn *c)
{
    if (c->fd >= 0) {
        if (c->registered)
            sm_event_loop_remove(v->loop, c->fd);
        close(c->fd);
        c->fd = -1;
        c->registered = 0;
    }
    c->pending_len = 0;
    c->owe_request = c->owe_response = c->owe_credit_update = c->owe_shutdown = 0;
    c->owe_rst = 1;
}

/* Write what the host socket takes now; count it as forwarded. */
static void flush_pending(sm_vsock *v, vsock_conn *c)
{
    while (c->pending_len && c->fd >= 0) {
        ssize_t n = send(c->fd, c->pending, c->pending_len, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            break;
        if (n <= 0) {
            conn_reset(v, c); /* host went away */
            return;
        }
        memmove(c->pending, c->pending + n, c->pending_len - (uint32_t)n);
        c->pending_len -= (uint32_t)n;
        c->fwd_cnt += (uint32_t)n;
    }
    if (c->fwd_cnt - c->last_fwd_cnt_sent >= SM_VSOCK_CONN_BUF_BYTES / 2)
        c->owe_credit_update = 1;
    if (!c->pending_len && c->guest_shut_send && !c->shut_wr_done && c->fd >= 0) {
        shutdown(c->fd, SHUT_WR);
        c->shut_wr_done = 1;
    }
}

/* ---- TX: guest -> host --------------------------------------------------------------- */

static int connect_guest_stream(sm_vsock *v, uint32_t port)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    char path[sizeof(v->uds_path) + 16];
    int len = snprintf(path, sizeof(path), "%s_%u", v->uds_path, port);
    if (len < 0 || (size_t)len >= sizeof(addr.sun_path))
        return -1;
    memcpy(addr.sun_path, path, (size_t)len + 1);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

static void conn_event(void *opaque, int fd, uint32_t events);

static void handle_tx_packet(sm_vsock *v, const vsock_header *h, const sm_vq_chain *chain)
{
    if (h->src_cid != v->guest_cid || h->dst_cid != SM_VSOCK_HOST_CID) {
        v->counters.packets_dropped++;
        return;
    }
    vsock_conn *c = conn_by_ports(v, h->dst_port, h->src_port);
    if (h->type != SM_VSOCK_TYPE_STREAM) {
        v->counters.packets_dropped++;
        return;
    }
    if (c) {
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
    }
    switch (h->op) {
    case SM_VSOCK_OP_REQUEST: {
        v->counters.guest_connection_requests++;
        if (c) { /* duplicate */
            conn_reset(v, c);
            return;
        }
        c = conn_alloc(v);
        if (!c)
            return; /* no slot: nothing to answer with; the guest times out */
        c->local_port = h->dst_port;
        c->peer_port = h->src_port;
        c->peer_buf_alloc = h->buf_alloc;
        c->peer_fwd_cnt = h->fwd_cnt;
        c->fd = connect_guest_stream(v, h->dst_port);
        c->state = CONN_ESTABLISHED;
        if (c->fd < 0) {
            v->counters.guest_connect_failures++;
            c->owe_rst = 1;
            return;
        }
        if (sm_event_loop_add(v->loop, c->fd, 0, conn_event, v) < 0) {
            close(c->fd);
            c->fd = -1;
            c->owe_rst = 1;
            return;
        }
        c->registered = 1;
        c->owe_response = 1;
        return;
    }
    case SM_VSOCK_OP_RESPONSE:
        if (!c || c->state != CONN_AWAIT_GUEST_RESPONSE) {
            v->counters.packets_dropped++;
            return;
        }
        c->state = CONN_ESTABLISHED;
        {
            /* The socket is fresh and its buffer empty: the short line goes out whole. */
            char ok[32];
            int n = snprintf(ok, sizeof(ok), "OK %u\n", c->local_port);
            if (c->fd < 0 || send(c->fd, ok, (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL) != n)
                conn_reset(v, c);
        }
        return;
    case SM_VSOCK_OP_RW: {
        if (!c || c->state != CONN_ESTABLISHED) {
            v->counters.packets_dropped++;
            if (!c) {
                /* Unknown stream: tell the guest to drop it. */
                vsock_conn *r = conn_alloc(v);
                if (r) {
                    r->state = CONN_ESTABLISHED;
                    r->local_port = h->dst_port;
                    r->peer_port = h->src_port;
                    r->owe_rst = 1;
                }
            }
            return;
        }
        uint32_t len = h->len;
        if (c->fd < 0 || c->guest_shut_send)
            return;
        if (len > SM_VSOCK_CONN_BUF_BYTES - c->pending_len) {
            v->counters.credit_violations++;
            conn_reset(v, c);
            return;
        }
        sm_vq_chain_read(chain, SM_VSOCK_HEADER_BYTES, c->pending + c->pending_len, len);
        c->pending_len += len;
        v->counters.tx_payload_bytes += len;
        flush_pending(v, c);
        return;
    }
    case SM_VSOCK_OP_CREDIT_UPDATE:
        if (!c)
            v->counters.packets_dropped++;
        return;
    case SM_VSOCK_OP_CREDIT_REQUEST:
        if (c)
            c->owe_credit_update = 1;
        else
            v->counters.packets_dropped++;
        return;
    case SM_VSOCK_OP_SHUTDOWN:
        if (!c) {
            v->counters.packets_dropped++;
            return;
        }
        if ((h->flags & (SM_VSOCK_SHUTDOWN_RCV | SM_VSOCK_SHUTDOWN_SEND)) ==
            (SM_VSOCK_SHUTDOWN_RCV | SM_VSOCK_SHUTDOWN_SEND)) {
            flush_pending(v, c);  /* best effort: deliver what the guest sent before */
            conn_reset(v, c);     /* full shutdown: answer with RST, close the host side */
            return;
        }
        if (h->flags & SM_VSOCK_SHUTDOWN_SEND) {
            c->guest_shut_send = 1;
            flush_pending(v, c);
        }
        return;
    case SM_VSOCK_OP_RST:
        v->counters.resets_received++;
        if (c)
            conn_free(v, c);
        return;
    default:
        v->counters.packets_dropped++;
        if (c)
            conn_reset(v, c);
        return;
    }
}

static void process_tx(sm_vsock *v)
{
    sm_virtio_mmio *t = v->transport;
    sm_virtqueue *q = &t->queues[SM_VSOCK_TX_INDEX];
    sm_vq_chain chain;
    int used = 0;
    while (sm_virtio_mmio_is_live_locked(t)) {
        int rc = sm_vq_pop(q, &chain);
        if (rc == SM_VQ_EMPTY)
            break;
        if (rc != SM_VQ_OK) {
            sm_virtio_mmio_mark_broken_locked(t, "%s: TX queue: %s",
                                              VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_QUEUE],
                                              sm_vq_error_message(rc));
            break;
        }
        if (chain.writable_bytes) {
            sm_virtio_mmio_mark_broken_locked(t, "%s", VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_TX_BUFFER_WRITABLE]);
            break;
        }
        vsock_header h;
        if (chain.readable_bytes < SM_VSOCK_HEADER_BYTES) {
            sm_virtio_mmio_mark_broken_locked(t, "%s", VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_TX_HEADER_TOO_SHORT]);
            break;
        }
        sm_vq_chain_read(&chain, 0, &h, sizeof(h));
        if (h.len > chain.readable_bytes - SM_VSOCK_HEADER_BYTES) {
            sm_virtio_mmio_mark_broken_locked(t, "%s (len %u, buffer %u)",
                                              VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_TX_LEN_BEYOND_BUFFER],
                                              h.len, chain.readable_bytes);
            break;
        }
        v->counters.tx_packets++;
        handle_tx_packet(v, &h, &chain);
        sm_vq_push_used(q, chain.head, 0);
        used = 1;
    }
    if (used)
        sm_virtio_mmio_signal_used_locked(t);
}

/* ---- RX: host -> guest --------------------------------------------------------------- */

static void fill_header(sm_vsock *v, const vsock_conn *c, vsock_header *h, uint16_t op)
{
    (void)v;
    memset(h, 0, sizeof(*h));
    h->src_cid = SM_VSOCK_HOST_CID;
    h->dst_cid = v->guest_cid;
    h->src_port = c->local_port;
    h->dst_port = c->peer_port;
    h->type = SM_VSOCK_TYPE_STREAM;
    h->op = op;
    h->buf_alloc = SM_VSOCK_CONN_BUF_BYTES;
    h->fwd_cnt = c->fwd_cnt;
}

/* Fills one RX chain from connection c; returns 1 if a packet was written, 0 if c had
 * nothing to send. */
static int rx_one(sm_vsock *v, vsock_conn *c, const sm_vq_chain *chain, uint32_t *written)
{
    vsock_header h;
    if (c->owe_rst) {
        fill_header(v, c, &h, SM_VSOCK_OP_RST);
        c->owe_rst = 0;
        v->counters.resets_sent++;
        sm_vq_chain_write(chain, 0, &h, sizeof(h));
        *written = sizeof(h);
        conn_free(v, c);
        return 1;
    }
    uint16_t op = 0;
    if (c->owe_request && v->transport_reset_unhandled)
        return 0; /* held: the guest's reset would take this connection for a dead one */
    if (c->owe_request) {
        op = SM_VSOCK_OP_REQUEST;
        c->owe_request = 0;
    } else if (c->owe_response) {
        op = SM_VSOCK_OP_RESPONSE;
        c->owe_response = 0;
    } else if (c->owe_credit_update) {
        op = SM_VSOCK_OP_CREDIT_UPDATE;
        c->owe_credit_update = 0;
    }
    if (op) {
        fill_header(v, c, &h, op);
        c->last_fwd_cnt_sent = c->fwd_cnt;
        sm_vq_chain_write(chain, 0, &h, sizeof(h));
        *written = sizeof(h);
        return 1;
    }
    if (c->state != CONN_ESTABLISHED || c->fd < 0)
        return 0;
    if (c->owe_shutdown) {
        fill_header(v, c, &h, SM_VSOCK_OP_SHUTDOWN);
        h.flags = SM_VSOCK_SHUTDOWN_RCV | SM_VSOCK_SHUTDOWN_SEND;
        c->owe_shutdown = 0;
        c->last_fwd_cnt_sent = c->fwd_cnt;
        sm_vq_chain_write(chain, 0, &h, sizeof(h));
        *written = sizeof(h);
        return 1;
    }
    if (c->host_eof)
        return 0;
    uint32_t room = chain->writable_bytes - SM_VSOCK_HEADER_BYTES;
    uint32_t want = peer_credit(c);
    if (want > room)
        want = room;
    if (want > SM_VSOCK_MAX_RW_PAYLOAD_BYTES)
        want = SM_VSOCK_MAX_RW_PAYLOAD_BYTES;
    if (want == 0)
        return 0;
    uint8_t buf[SM_VSOCK_MAX_RW_PAYLOAD_BYTES];
    ssize_t n = recv(c->fd, buf, want, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
        return 0;
    if (n <= 0) {
        /* Host closed (or failed): tell the guest we are done in both directions. */
        c->host_eof = 1;
        fill_header(v, c, &h, SM_VSOCK_OP_SHUTDOWN);
        h.flags = SM_VSOCK_SHUTDOWN_RCV | SM_VSOCK_SHUTDOWN_SEND;
        sm_vq_chain_write(chain, 0, &h, sizeof(h));
        *written = sizeof(h);
        return 1;
    }
    fill_header(v, c, &h, SM_VSOCK_OP_RW);
    h.len = (uint32_t)n;
    c->tx_cnt += (uint32_t)n;
    c->last_fwd_cnt_sent = c->fwd_cnt;
    sm_vq_chain_write(chain, 0, &h, sizeof(h));
    sm_vq_chain_write(chain, SM_VSOCK_HEADER_BYTES, buf, (uint32_t)n);
    v->counters.rx_payload_bytes += (uint64_t)n;
    *written = sizeof(h) + (uint32_t)n;
    return 1;
}

static void rx_pump_locked(sm_vsock *v)
{
    sm_virtio_mmio *t = v->transport;
    if (!sm_virtio_mmio_is_live_locked(t))
        return;
    sm_virtqueue *q = &t->queues[SM_VSOCK_RX_INDEX];
    int used = 0;
    int progress = 1;
    v->rx_starved = 0;
    while (progress) {
        progress = 0;
        for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS && sm_virtio_mmio_is_live_locked(t); i++) {
            vsock_conn *c = &v->conns[i];
            if (c->state == CONN_FREE || c->state == CONN_HOST_HANDSHAKE)
                continue;
            sm_vq_chain chain;
            int rc = sm_vq_pop(q, &chain);
            if (rc == SM_VQ_EMPTY) {
                v->rx_starved = 1;
                goto out;
            }
            if (rc != SM_VQ_OK) {
                sm_virtio_mmio_mark_broken_locked(t, "%s: RX queue: %s",
                                                  VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_QUEUE],
                                                  sm_vq_error_message(rc));
                goto out;
            }
            if (chain.writable_bytes < SM_VSOCK_HEADER_BYTES || chain.readable_bytes) {
                sm_virtio_mmio_mark_broken_locked(t, "%s", VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_RX_BUFFER_TOO_SMALL]);
                goto out;
            }
            uint32_t written = 0;
            if (rx_one(v, c, &chain, &written)) {
                sm_vq_push_used(q, chain.head, written);
                v->counters.rx_packets++;
                used = 1;
                progress = 1;
            } else {
                sm_vq_undo_pop(q);
            }
        }
    }
out:
    if (used)
        sm_virtio_mmio_signal_used_locked(t);
    update_all_interest(v);
}

/* ---- event queue --------------------------------------------------------------------- */

/* Delivers an owed transport reset into the guest's next event buffer; without one it stays
 * owed until the guest posts one (an event queue notify). */
static void deliver_transport_reset_locked(sm_vsock *v)
{
    sm_virtio_mmio *t = v->transport;
    sm_virtqueue *q = &t->queues[SM_VSOCK_EVENT_INDEX];
    if (!v->transport_reset_pending || !sm_virtio_mmio_is_live_locked(t) || !q->ready)
        return;
    sm_vq_chain chain;
    int rc = sm_vq_pop(q, &chain);
    if (rc == SM_VQ_EMPTY)
        return;
    if (rc != SM_VQ_OK) {
        sm_virtio_mmio_mark_broken_locked(t, "%s: event queue: %s",
                                          VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_QUEUE],
                                          sm_vq_error_message(rc));
        return;
    }
    if (chain.writable_bytes < SM_VSOCK_EVENT_BYTES || chain.readable_bytes) {
        sm_virtio_mmio_mark_broken_locked(t, "%s", VSOCK_ERROR_MESSAGES[SM_VSOCK_ERR_EVENT_BUFFER_TOO_SMALL]);
        return;
    }
    uint32_t id = SM_VSOCK_EVENT_TRANSPORT_RESET;
    sm_vq_chain_write(&chain, 0, &id, sizeof(id));
    sm_vq_push_used(q, chain.head, sizeof(id));
    v->transport_reset_pending = 0;
    v->transport_reset_unhandled = 1;
    v->counters.events_sent++;
    sm_virtio_mmio_signal_used_locked(t);
}

/* ---- host side: listener and sockets ------------------------------------------------- */

static void handle_connect_line(sm_vsock *v, vsock_conn *c)
{
    for (;;) {
        char ch;
        ssize_t n = recv(c->fd, &ch, 1, MSG_DONTWAIT);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        if (n <= 0) {
            conn_free(v, c);
            return;
        }
        if (ch == '\n') {
            c->line[c->line_len] = 0;
            unsigned port = 0;
            char extra;
            if (sscanf(c->line, "CONNECT %u%c", &port, &extra) != 1) {
                v->counters.host_connect_lines_malformed++;
                conn_free(v, c);
                return;
            }
            c->local_port = v->next_host_port;
            /* Stay in [FIRST, 2^32 - 2]: 2^32 - 1 is VMADDR_PORT_ANY to the guest. */
            v->next_host_port = v->next_host_port >= UINT32_MAX - 1 ? SM_VSOCK_FIRST_HOST_PORT
                                                                   : v->next_host_port + 1;
            c->peer_port = port;
            c->state = CONN_AWAIT_GUEST_RESPONSE;
            c->owe_request = 1;
            if (v->transport_reset_pending || v->transport_reset_unhandled)
                v->counters.host_connects_held++;
            update_interest(v, c);
            rx_pump_locked(v);
            return;
        }
        if (c->line_len + 1 >= sizeof(c->line)) {
            v->counters.host_connect_lines_malformed++;
            conn_free(v, c);
            return;
        }
        c->line[c->line_len++] = ch;
    }
}

static void conn_event(void *opaque, int fd, uint32_t events)
{
    sm_vsock *v = opaque;
    pthread_mutex_lock(&v->transport->lock);
    vsock_conn *c = conn_by_fd(v, fd);
    if (c) {
        if (c->state == CONN_HOST_HANDSHAKE) {
            handle_connect_line(v, c);
        } else if (c->state != CONN_ESTABLISHED && (events & (EPOLLHUP | EPOLLERR))) {
            conn_reset(v, c); /* host gave up before the guest answered */
            rx_pump_locked(v);
        } else {
            if (events & EPOLLOUT)
                flush_pending(v, c);
            if (events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLOUT))
                rx_pump_locked(v);
            c = conn_by_fd(v, fd);
            if (c)
                update_interest(v, c);
        }
    }
    pthread_mutex_unlock(&v->transport->lock);
}

static void listener_event(void *opaque, int fd, uint32_t events)
{
    (void)events;
    sm_vsock *v = opaque;
    int cfd = accept4(fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (cfd < 0)
        return;
    pthread_mutex_lock(&v->transport->lock);
    vsock_conn *c = conn_alloc(v);
    if (!c) {
        pthread_mutex_unlock(&v->transport->lock);
        close(cfd);
        return;
    }
    c->fd = cfd;
    c->state = CONN_HOST_HANDSHAKE;
    v->counters.host_connections_accepted++;
    if (sm_event_loop_add(v->loop, cfd, EPOLLIN, conn_event, v) < 0) {
        conn_free(v, c);
    } else {
        c->registered = 1;
        c->epoll_mask = EPOLLIN;
    }
    pthread_mutex_unlock(&v->transport->lock);
}

int sm_vsock_attach(sm_vsock *v, sm_virtio_mmio *t, struct sm_event_loop *loop, char *err, size_t err_len)
{
    v->transport = t;
    v->loop = loop;
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof(addr));
    addr.sun_family = AF_UNIX;
    snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", v->uds_path);
    v->listen_fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (v->listen_fd < 0) {
        snprintf(err, err_len, "virtio-vsock: socket() failed: %s", strerror(errno));
        return -1;
    }
    unlink(v->uds_path); /* a stale socket from an earlier run */
    if (bind(v->listen_fd, (struct sockaddr *)&addr, sizeof(addr)) < 0 || listen(v->listen_fd, 64) < 0) {
        snprintf(err, err_len, "virtio-vsock: cannot listen on %s: %s", v->uds_path, strerror(errno));
        return -1;
    }
    if (sm_event_loop_add(loop, v->listen_fd, EPOLLIN, listener_event, v) < 0) {
        snprintf(err, err_len, "virtio-vsock: event loop registration failed");
        return -1;
    }
    return 0;
}

/* ---- virtio ops ---------------------------------------------------------------------- */

static uint64_t vsock_features(void *dev)
{
    (void)dev;
    return 0; /* VERSION_1 is added by the transport; stream sockets need no feature bit */
}

static void vsock_config_read(void *dev, uint32_t offset, uint8_t *data, uint32_t len)
{
    sm_vsock *v = dev;
    uint8_t cfg[CONFIG_BYTES];
    memcpy(cfg + CONFIG_GUEST_CID_OFFSET, &v->guest_cid, 8);
    if (offset < CONFIG_BYTES && len <= CONFIG_BYTES - offset)
        memcpy(data, cfg + offset, len);
}

static void vsock_activate(void *dev)
{
    sm_vsock *v = dev;
    process_tx(v);
    rx_pump_locked(v);
}

static void vsock_notify(void *dev, uint16_t queue)
{
    sm_vsock *v = dev;
    if (queue == SM_VSOCK_TX_INDEX)
        process_tx(v);
    if (queue == SM_VSOCK_EVENT_INDEX) {
        /* After a delivered reset, the driver's next event notify comes from the work that
         * handled it (Linux: virtio_transport_event_work re-posts and kicks): host CONNECTs
         * held for it may go now. */
        if (v->transport_reset_unhandled) {
            v->transport_reset_unhandled = 0;
            v->counters.transport_resets_handled++;
        }
        deliver_transport_reset_locked(v);
    }
    /* TX may owe the guest answers; an RX notify means fresh buffers. */
    rx_pump_locked(v);
}

static void vsock_reset(void *dev)
{
    sm_vsock *v = dev;
    v->transport_reset_pending = 0; /* a reinitialising driver reads its CID anyway */
    v->transport_reset_unhandled = 0;
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++)
        conn_free(v, &v->conns[i]);
}

static void vsock_counters(void *dev, sm_device_info *info, uint32_t *n)
{
    sm_vsock *v = dev;
#define ADD(field)                                                                                 \
    do {                                                                                           \
        snprintf(info->counter_names[*n], sizeof(info->counter_names[*n]), "%s", #field);          \
        info->counters[(*n)++] = v->counters.field;                                                \
    } while (0)
    ADD(tx_packets);
    ADD(rx_packets);
    ADD(tx_payload_bytes);
    ADD(rx_payload_bytes);
    ADD(host_connections_accepted);
    ADD(host_connect_lines_malformed);
    ADD(guest_connection_requests);
    ADD(guest_connect_failures);
    ADD(resets_sent);
    ADD(resets_received);
    ADD(packets_dropped);
    ADD(credit_violations);
    ADD(connections_table_full);
    ADD(active_connections);
    ADD(transport_resets);
    ADD(events_sent);
    ADD(transport_resets_handled);
    ADD(host_connects_held);
#undef ADD
}

/* Connections are host sockets and do not carry over; the port numbering does (see the
 * header: the guest's dead sockets still hold the ports handed out so far). */
static size_t vsock_save(void *dev, uint8_t *buf, size_t cap)
{
    sm_vsock *v = dev;
    sm_vsock_state s;
    memset(&s, 0, sizeof(s));
    s.next_host_port = v->next_host_port;
    if (sizeof(s) <= cap)
        memcpy(buf, &s, sizeof(s));
    return sizeof(s);
}

static int vsock_restore(void *dev, const uint8_t *buf, size_t len, char *err, size_t err_len)
{
    sm_vsock *v = dev;
    sm_vsock_state s;
    if (len != sizeof(s)) {
        snprintf(err, err_len, "vsock state is %zu bytes, this core's is %zu", len, sizeof(s));
        return -1;
    }
    memcpy(&s, buf, sizeof(s));
    if (s.next_host_port < SM_VSOCK_FIRST_HOST_PORT || s.next_host_port == UINT32_MAX) {
        snprintf(err, err_len, "vsock state: next host port %u is outside [%u, %u]",
                 s.next_host_port, SM_VSOCK_FIRST_HOST_PORT, UINT32_MAX - 1);
        return -1;
    }
    v->next_host_port = s.next_host_port;
    if (!v->transport->activated)
        return 0; /* no driver yet: it reads the CID when it starts */
    v->transport_reset_pending = 1;
    v->counters.transport_resets++;
    deliver_transport_reset_locked(v);
    return 0;
}

static void vsock_destroy(void *dev)
{
    sm_vsock *v = dev;
    for (int i = 0; i < SM_VSOCK_MAX_CONNECTIONS; i++) {
        vsock_conn *c = &v->conns[i];
        if (c->state != CONN_FREE) {
            if (c->fd >= 0)
                close(c->fd);
            free(c->pending);
            c->state = CONN_FREE;
        }
    }
    if (v->listen_fd >= 0) {
        close(v->listen_fd);
        unlink(v->uds_path);
    }
    free(v);
}

const sm_virtio_ops SM_VSOCK_OPS = {
    .device_id = SM_VIRTIO_ID_VSOCK,
    .num_queues = SM_VSOCK_NUM_QUEUES,
    .device_features = vsock_features,
    .config_read = vsock_config_read,
    .config_write = NULL,
    .activate = vsock_activate,
    .queue_notify = vsock_notify,
    .reset = vsock_reset,
    .counters = vsock_counters,
    .destroy = vsock_destroy,
    .save = vsock_save,
    .restore = vsock_restore,
};

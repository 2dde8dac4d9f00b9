/* probe_vsock.c — see probe_vsock.h. Packet handling follows Linux's
 * net/vmw_vsock/virtio_transport_common.c (virtio_transport_recv_pkt and its helpers). */
#include "probe.h"
#include "probe_irq.h"
#include "probe_vsock.h"

#define VIRTIO_ID_VSOCK 19
#define RX_QUEUE_INDEX 0
#define TX_QUEUE_INDEX 1
#define EVENT_QUEUE_INDEX 2
#define QUEUE_SIZE 64
#define HEADER_BYTES 44
#define RX_BUFFERS 16
#define RX_PAYLOAD_BYTES 4096
#define RX_BUFFER_BYTES (HEADER_BYTES + RX_PAYLOAD_BYTES)
#define EVENT_BUFFERS 4
#define EVENT_BYTES 4
#define EVENT_TRANSPORT_RESET 0
#define MAX_PACKET_PAYLOAD_BYTES 65536u  /* Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE */
#define FIRST_LOCAL_PORT 49152u          /* ports of the connections we open */
#define CONFIG_GUEST_CID 0
#define TYPE_STREAM 1
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define SHUTDOWN_RCV 1
#define SHUTDOWN_SEND 2

struct __attribute__((packed)) vsock_header {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
};

struct connection {
    int used;
    enum vsock_state state;
    int in_backlog;         /* accepted by the stack, not yet by the probe */
    uint32_t backlog_seq;   /* accept order */
    uint32_t local_port, peer_port;
    uint8_t *ring;          /* received, unread bytes: VSOCK_RX_BUF_ALLOC_BYTES */
    uint32_t ring_start, ring_len;
    uint32_t fwd_cnt;       /* bytes the probe has read */
    uint32_t fwd_cnt_told;  /* fwd_cnt in the last header the peer got */
    uint32_t peer_buf_alloc, peer_fwd_cnt, tx_cnt;
};

static struct virtq rxq, txq, evq;
static uint64_t device_base;
static uint64_t guest_cid;
static int irq_enabled;
static uint8_t *rx_buffers;
static volatile uint32_t *event_buffers;
static struct connection conns[VSOCK_MAX_CONNECTIONS];
static uint32_t listeners[VSOCK_MAX_LISTENERS];
static int n_listeners;
static uint32_t next_backlog_seq;
static uint32_t next_local_port = FIRST_LOCAL_PORT;
static struct vsock_header tx_header;

static uint64_t read_guest_cid(void)
{
    return (uint64_t)mmio_read32(device_base + VIRTIO_MMIO_CONFIG + CONFIG_GUEST_CID) |
           ((uint64_t)mmio_read32(device_base + VIRTIO_MMIO_CONFIG + CONFIG_GUEST_CID + 4) << 32);
}

static void give_rx_buffer(uint16_t i)
{
    rxq.desc[i].addr = (uint64_t)(rx_buffers + (uint64_t)i * RX_BUFFER_BYTES);
    rxq.desc[i].len = RX_BUFFER_BYTES;
    rxq.desc[i].flags = VRING_DESC_F_WRITE;
    virtq_publish(&rxq, i);
}

static void give_event_buffer(uint16_t i)
{
    evq.desc[i].addr = (uint64_t)&event_buffers[i];
    evq.desc[i].len = EVENT_BYTES;
    evq.desc[i].flags = VRING_DESC_F_WRITE;
    virtq_publish(&evq, i);
}

const char *vsock_init(void)
{
    device_base = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!device_base)
        return "no vsock device on the command line";
    if (!virtio_negotiate(device_base, 0) || virtq_setup(&rxq, device_base, RX_QUEUE_INDEX, QUEUE_SIZE) ||
        virtq_setup(&txq, device_base, TX_QUEUE_INDEX, QUEUE_SIZE) ||
        virtq_setup(&evq, device_base, EVENT_QUEUE_INDEX, QUEUE_SIZE))
        return "negotiation or queue setup";
    guest_cid = read_guest_cid();
    rx_buffers = alloc_pages_nozero((RX_BUFFERS * RX_BUFFER_BYTES + PROBE_PAGE_BYTES - 1) / PROBE_PAGE_BYTES);
    event_buffers = alloc_pages(1);
    uint8_t *rings = alloc_pages_nozero(VSOCK_MAX_CONNECTIONS * VSOCK_RX_BUF_ALLOC_BYTES / PROBE_PAGE_BYTES);
    for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++)
        conns[i].ring = rings + (uint64_t)i * VSOCK_RX_BUF_ALLOC_BYTES;
    irq_enabled = probe_irq_enable(virtio_irq(device_base)) == 0;
    virtio_driver_ok(device_base);
    for (uint16_t i = 0; i < RX_BUFFERS; i++)
        give_rx_buffer(i);
    for (uint16_t i = 0; i < EVENT_BUFFERS; i++)
        give_event_buffer(i);
    return 0;
}

uint64_t vsock_guest_cid(void) { return guest_cid; }

/* ---- sending --------------------------------------------------------------------------- */

/* One packet; c (NULL for an RST to an unknown connection) lends its credit fields. The
 * payload is sent from where it is: the device has read it when the used element is back. */
static int send_packet(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags,
                       const void *payload, uint32_t len, struct connection *c)
{
    memset(&tx_header, 0, sizeof(tx_header));
    tx_header.src_cid = guest_cid;
    tx_header.dst_cid = VSOCK_HOST_CID;
    tx_header.src_port = src_port;
    tx_header.dst_port = dst_port;
    tx_header.len = len;
    tx_header.type = TYPE_STREAM;
    tx_header.op = op;
    tx_header.flags = flags;
    if (c) {
        tx_header.buf_alloc = VSOCK_RX_BUF_ALLOC_BYTES;
        tx_header.fwd_cnt = c->fwd_cnt;
        c->fwd_cnt_told = c->fwd_cnt;
    }
    txq.desc[0].addr = (uint64_t)&tx_header;
    txq.desc[0].len = HEADER_BYTES;
    txq.desc[0].flags = len ? VRING_DESC_F_NEXT : 0;
    txq.desc[0].next = 1;
    if (len) {
        txq.desc[1].addr = (uint64_t)payload;
        txq.desc[1].len = len;
        txq.desc[1].flags = 0;
    }
    virtq_publish(&txq, 0);
    return virtq_wait_used(&txq, 0, 0);
}

static int send_on(struct connection *c, uint16_t op, uint32_t flags, const void *payload, uint32_t len)
{
    return send_packet(c->local_port, c->peer_port, op, flags, payload, len, c);
}

/* ---- connections ----------------------------------------------------------------------- */

static struct connection *handle_of(int conn)
{
    return conn >= 0 && conn < VSOCK_MAX_CONNECTIONS && conns[conn].used ? &conns[conn] : 0;
}

static struct connection *alloc_connection(uint32_t local_port, uint32_t peer_port, enum vsock_state state)
{
    for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
        struct connection *c = &conns[i];
        if (c->used)
            continue;
        uint8_t *ring = c->ring;
        memset(c, 0, sizeof(*c));
        c->ring = ring;
        c->used = 1;
        c->state = state;
        c->local_port = local_port;
        c->peer_port = peer_port;
        return c;
    }
    return 0;
}

/* A connection closed while in the backlog stays there: accept() hands it over closed, with
 * what the peer sent before (as Linux's accept queue does). */
static void reset_connection(struct connection *c)
{
    send_on(c, OP_RST, 0, 0, 0);
    c->state = VSOCK_CLOSED;
}

/* Closed connections are out of the lookup: a packet for one is answered as for a stranger. */
static struct connection *find_connection(uint32_t local_port, uint32_t peer_port)
{
    for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
        struct connection *c = &conns[i];
        if (c->used && c->state != VSOCK_CLOSED && c->local_port == local_port &&
            c->peer_port == peer_port)
            return c;
    }
    return 0;
}

static int is_listening(uint32_t port)
{
    for (int i = 0; i < n_listeners; i++)
        if (listeners[i] == port)
            return 1;
    return 0;
}

int vsock_listen(uint32_t port)
{
    if (is_listening(port))
        return 0;
    if (n_listeners == VSOCK_MAX_LISTENERS)
        return -1;
    listeners[n_listeners++] = port;
    return 0;
}

int vsock_accept(uint32_t port)
{
    int oldest = -1;
    for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++) {
        struct connection *c = &conns[i];
        if (c->used && c->in_backlog && c->local_port == port &&
            (oldest < 0 || (int32_t)(c->backlog_seq - conns[oldest].backlog_seq) < 0))
            oldest = i;
    }
    if (oldest >= 0)
        conns[oldest].in_backlog = 0;
    return oldest;
}

int vsock_connect(uint32_t host_port)
{
    struct connection *c = alloc_connection(next_local_port++, host_port, VSOCK_CONNECTING);
    if (!c)
        return -1;
    send_on(c, OP_REQUEST, 0, 0, 0);
    return (int)(c - conns);
}

enum vsock_state vsock_state(int conn)
{
    struct connection *c = handle_of(conn);
    return c ? c->state : VSOCK_CLOSED;
}

uint32_t vsock_peer_port(int conn)
{
    struct connection *c = handle_of(conn);
    return c ? c->peer_port : 0;
}

size_t vsock_recv(int conn, void *buf, size_t len)
{
    struct connection *c = handle_of(conn);
    if (!c)
        return 0;
    uint32_t n = len < c->ring_len ? (uint32_t)len : c->ring_len;
    uint32_t first = VSOCK_RX_BUF_ALLOC_BYTES - c->ring_start;
    if (first > n)
        first = n;
    memcpy(buf, c->ring + c->ring_start, first);
    memcpy((uint8_t *)buf + first, c->ring, n - first);
    c->ring_start = (c->ring_start + n) % VSOCK_RX_BUF_ALLOC_BYTES;
    c->ring_len -= n;
    c->fwd_cnt += n;
    /* The peer stops sending when it believes our buffer full: once what it believes free
     * falls under half, tell it what we have read since (Linux's rule, in do_dequeue). */
    uint32_t believed_used = c->ring_len + (c->fwd_cnt - c->fwd_cnt_told);
    if (c->state == VSOCK_ESTABLISHED && c->fwd_cnt != c->fwd_cnt_told &&
        VSOCK_RX_BUF_ALLOC_BYTES - believed_used < VSOCK_RX_BUF_ALLOC_BYTES / 2)
        send_on(c, OP_CREDIT_UPDATE, 0, 0, 0);
    return n;
}

size_t vsock_send(int conn, const void *buf, size_t len)
{
    struct connection *c = handle_of(conn);
    size_t sent = 0;
    while (c && c->state == VSOCK_ESTABLISHED && sent < len) {
        uint32_t in_flight = c->tx_cnt - c->peer_fwd_cnt;
        uint32_t credit = in_flight >= c->peer_buf_alloc ? 0 : c->peer_buf_alloc - in_flight;
        uint32_t n = len - sent < credit ? (uint32_t)(len - sent) : credit;
        if (n > MAX_PACKET_PAYLOAD_BYTES)
            n = MAX_PACKET_PAYLOAD_BYTES;
        if (n == 0 || send_on(c, OP_RW, 0, (const uint8_t *)buf + sent, n))
            break;
        c->tx_cnt += n;
        sent += n;
    }
    return sent;
}

int vsock_send_all(int conn, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    for (;;) {
        size_t sent = vsock_send(conn, p, len);
        p += sent;
        len -= sent;
        if (!len)
            return 0;
        if (vsock_state(conn) != VSOCK_ESTABLISHED)
            return -1;
        vsock_wait();
        vsock_poll();
    }
}

void vsock_shutdown(int conn)
{
    struct connection *c = handle_of(conn);
    if (c && c->state == VSOCK_ESTABLISHED) {
        send_on(c, OP_SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, 0, 0);
        c->state = VSOCK_CLOSING;
    }
}

void vsock_close(int conn)
{
    struct connection *c = handle_of(conn);
    if (!c)
        return;
    if (c->state != VSOCK_CLOSED)
        send_on(c, OP_RST, 0, 0, 0);
    c->used = 0;
}

/* ---- receiving ------------------------------------------------------------------------- */

static void accept_request(const struct vsock_header *h)
{
    struct connection *c = alloc_connection(h->dst_port, h->src_port, VSOCK_ESTABLISHED);
    if (!c) {
        send_packet(h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0);
        return;
    }
    c->in_backlog = 1;
    c->backlog_seq = next_backlog_seq++;
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    send_on(c, OP_RESPONSE, 0, 0, 0);
}

static void receive_data(struct connection *c, const uint8_t *payload, uint32_t len)
{
    if (c->state != VSOCK_ESTABLISHED)
        return; /* CLOSING: we said we read no more */
    if (len > VSOCK_RX_BUF_ALLOC_BYTES - c->ring_len) {
        reset_connection(c); /* the peer sent past our credit */
        return;
    }
    uint32_t end = (c->ring_start + c->ring_len) % VSOCK_RX_BUF_ALLOC_BYTES;
    uint32_t first = VSOCK_RX_BUF_ALLOC_BYTES - end;
    if (first > len)
        first = len;
    memcpy(c->ring + end, payload, first);
    memcpy(c->ring, payload + first, len - first);
    c->ring_len += len;
}

static void handle_packet(const struct vsock_header *h, const uint8_t *payload, uint32_t len)
{
    if (h->type != TYPE_STREAM || h->src_cid != VSOCK_HOST_CID || h->dst_cid != guest_cid)
        return;
    struct connection *c = find_connection(h->dst_port, h->src_port);
    if (!c) {
        if (h->op == OP_REQUEST && is_listening(h->dst_port))
            accept_request(h);
        else if (h->op != OP_RST)
            send_packet(h->dst_port, h->src_port, OP_RST, 0, 0, 0, 0);
        return;
    }
    c->peer_buf_alloc = h->buf_alloc;
    c->peer_fwd_cnt = h->fwd_cnt;
    switch (h->op) {
    case OP_RESPONSE:
        if (c->state == VSOCK_CONNECTING)
            c->state = VSOCK_ESTABLISHED;
        else
            reset_connection(c);
        break;
    case OP_RW:
        receive_data(c, payload, len);
        break;
    case OP_CREDIT_UPDATE:
        break; /* the credit fields were all it carried */
    case OP_CREDIT_REQUEST:
        send_on(c, OP_CREDIT_UPDATE, 0, 0, 0);
        break;
    case OP_SHUTDOWN:
        /* The host only shuts down both ways at once; Linux answers that with RST. */
        reset_connection(c);
        break;
    case OP_RST:
        c->state = VSOCK_CLOSED;
        break;
    default: /* a second REQUEST, or an op we do not know */
        reset_connection(c);
        break;
    }
}

/* The host restored a snapshot: its side of every connection is gone, and the CID may be
 * another (Linux's virtio_vsock_event_handle). */
static void transport_reset(void)
{
    guest_cid = read_guest_cid();
    for (int i = 0; i < VSOCK_MAX_CONNECTIONS; i++)
        conns[i].state = VSOCK_CLOSED;
    put_str("vsock: transport reset: connections dropped, cid ");
    put_dec(guest_cid);
    put_line(", listeners kept");
}

int vsock_poll(void)
{
    int handled = 0;
    uint32_t id, len;
    virtio_ack_interrupts(device_base);
    /* Events first: a reset must not close connections that arrived after it. */
    while (virtq_used_pending(&evq) && virtq_wait_used(&evq, &id, &len) == 0) {
        if (id >= EVENT_BUFFERS)
            continue;
        if (len >= EVENT_BYTES && event_buffers[id] == EVENT_TRANSPORT_RESET)
            transport_reset();
        give_event_buffer((uint16_t)id);
        handled++;
    }
    while (virtq_used_pending(&rxq) && virtq_wait_used(&rxq, &id, &len) == 0) {
        if (id >= RX_BUFFERS)
            continue;
        const uint8_t *buf = rx_buffers + (uint64_t)id * RX_BUFFER_BYTES;
        if (len >= HEADER_BYTES) {
            struct vsock_header h;
            memcpy(&h, buf, HEADER_BYTES);
            uint32_t payload = len - HEADER_BYTES < RX_PAYLOAD_BYTES ? len - HEADER_BYTES : RX_PAYLOAD_BYTES;
            if (h.len < payload)
                payload = h.len;
            handle_packet(&h, buf + HEADER_BYTES, payload);
        }
        give_rx_buffer((uint16_t)id);
        handled++;
    }
    return handled;
}

void vsock_wait(void)
{
    if (virtq_used_pending(&rxq) || virtq_used_pending(&evq))
        return;
    if (irq_enabled)
        probe_irq_wait();
    else
        __asm__ volatile("pause");
}

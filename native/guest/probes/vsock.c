/* vsock probe: a guest vsock stack the way Linux's virtio_transport drives the device.
 * 1. listens on port listen= (default 1234): accepts the host's connection (REQUEST ->
 *    RESPONSE), echoes every RW payload upper-cased, answers the host's SHUTDOWN with RST;
 * 2. connects to host port connect= (default 5000): REQUEST, waits RESPONSE, sends one
 *    line, SHUTDOWN, waits for the RST;
 * then reports. */
#include "probe.h"

#define VIRTIO_ID_VSOCK 19
#define HOST_CID 2
#define HEADER_BYTES 44
#define RX_BUFFERS 8
#define RX_BUFFER_BYTES (4096 + HEADER_BYTES)
#define OUR_BUF_ALLOC 65536
#define OP_REQUEST 1
#define OP_RESPONSE 2
#define OP_RST 3
#define OP_SHUTDOWN 4
#define OP_RW 5
#define OP_CREDIT_UPDATE 6
#define OP_CREDIT_REQUEST 7
#define TYPE_STREAM 1
#define GUEST_CONNECT_SRC_PORT 7777

struct __attribute__((packed)) vsock_hdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
};

static struct virtq rxq, txq, evq;
static uint8_t *rx_bufs;
static uint64_t guest_cid;
static uint32_t fwd_cnt; /* payload bytes we consumed */
static struct vsock_hdr tx_hdr;
static uint8_t tx_payload[4096];

static void rx_give(uint16_t i)
{
    rxq.desc[i].addr = (uint64_t)(rx_bufs + (uint64_t)i * RX_BUFFER_BYTES);
    rxq.desc[i].len = RX_BUFFER_BYTES;
    rxq.desc[i].flags = VRING_DESC_F_WRITE;
    virtq_publish(&rxq, i);
}

static int send_packet(uint32_t src_port, uint32_t dst_port, uint16_t op, uint32_t flags,
                       const void *payload, uint32_t len)
{
    memset(&tx_hdr, 0, sizeof(tx_hdr));
    tx_hdr.src_cid = guest_cid;
    tx_hdr.dst_cid = HOST_CID;
    tx_hdr.src_port = src_port;
    tx_hdr.dst_port = dst_port;
    tx_hdr.len = len;
    tx_hdr.type = TYPE_STREAM;
    tx_hdr.op = op;
    tx_hdr.flags = flags;
    tx_hdr.buf_alloc = OUR_BUF_ALLOC;
    tx_hdr.fwd_cnt = fwd_cnt;
    txq.desc[0].addr = (uint64_t)&tx_hdr;
    txq.desc[0].len = HEADER_BYTES;
    txq.desc[0].flags = len ? VRING_DESC_F_NEXT : 0;
    txq.desc[0].next = 1;
    if (len) {
        memcpy(tx_payload, payload, len);
        txq.desc[1].addr = (uint64_t)tx_payload;
        txq.desc[1].len = len;
        txq.desc[1].flags = 0;
    }
    virtq_publish(&txq, 0);
    return virtq_wait_used(&txq, 0, 0);
}

/* Next received packet: header copied to h, payload to data (<= 4096). Returns -1 on timeout. */
static int recv_packet(struct vsock_hdr *h, uint8_t *data)
{
    uint32_t id, len;
    if (virtq_wait_used(&rxq, &id, &len))
        return -1;
    uint8_t *buf = rx_bufs + (uint64_t)id * RX_BUFFER_BYTES;
    memcpy(h, buf, HEADER_BYTES);
    if (h->len > 4096)
        h->len = 4096;
    memcpy(data, buf + HEADER_BYTES, h->len);
    rx_give((uint16_t)id);
    return 0;
}

int probe_main(void)
{
    uint32_t listen_port = (uint32_t)cmdline_get_u64("listen", 1234);
    uint32_t connect_port = (uint32_t)cmdline_get_u64("connect", 5000);
    uint64_t base = virtio_find(VIRTIO_ID_VSOCK, 0);
    if (!base) {
        put_line("PROBE vsock FAIL no vsock device on the command line");
        return 1;
    }
    if (!virtio_negotiate(base, 0) || virtq_setup(&rxq, base, 0, 64) ||
        virtq_setup(&txq, base, 1, 64) || virtq_setup(&evq, base, 2, 64)) {
        put_line("PROBE vsock FAIL negotiation or queue setup");
        return 1;
    }
    guest_cid = (uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG) |
                ((uint64_t)mmio_read32(base + VIRTIO_MMIO_CONFIG + 4) << 32);
    rx_bufs = alloc_pages((RX_BUFFERS * RX_BUFFER_BYTES + PROBE_PAGE_BYTES - 1) / PROBE_PAGE_BYTES);
    virtio_driver_ok(base);
    for (uint16_t i = 0; i < RX_BUFFERS; i++)
        rx_give(i);
    put_str("VSOCK ready cid=");
    put_dec(guest_cid);
    put_str(" listening on ");
    put_dec(listen_port);
    put_char('\n');

    static struct vsock_hdr h;
    static uint8_t data[4096];
    uint32_t host_port = 0, echoed = 0;
    int done = 0;
    while (!done) {
        if (recv_packet(&h, data)) {
            put_line("PROBE vsock FAIL timed out waiting for the host");
            return 1;
        }
        if (h.dst_port != listen_port || h.src_cid != HOST_CID) {
            put_line("ignoring a packet for another port");
            continue;
        }
        switch (h.op) {
        case OP_REQUEST:
            host_port = h.src_port;
            put_str("accepted host port ");
            put_dec(host_port);
            put_char('\n');
            send_packet(listen_port, host_port, OP_RESPONSE, 0, 0, 0);
            break;
        case OP_RW:
            fwd_cnt += h.len;
            for (uint32_t i = 0; i < h.len; i++)
                if (data[i] >= 'a' && data[i] <= 'z')
                    data[i] = (uint8_t)(data[i] - 'a' + 'A');
            send_packet(listen_port, host_port, OP_RW, 0, data, h.len);
            echoed += h.len;
            break;
        case OP_CREDIT_REQUEST:
            send_packet(listen_port, host_port, OP_CREDIT_UPDATE, 0, 0, 0);
            break;
        case OP_SHUTDOWN:
            send_packet(listen_port, host_port, OP_RST, 0, 0, 0);
            done = 1;
            break;
        case OP_RST:
            done = 1;
            break;
        default:
            break;
        }
    }
    put_str("echoed bytes ");
    put_dec(echoed);
    put_char('\n');

    /* Guest-initiated stream. */
    fwd_cnt = 0;
    send_packet(GUEST_CONNECT_SRC_PORT, connect_port, OP_REQUEST, 0, 0, 0);
    for (;;) {
        if (recv_packet(&h, data)) {
            put_line("PROBE vsock FAIL no answer to our REQUEST");
            return 1;
        }
        if (h.dst_port != GUEST_CONNECT_SRC_PORT)
            continue;
        if (h.op == OP_RST) {
            put_line("PROBE vsock FAIL host refused our connection (RST)");
            return 1;
        }
        if (h.op == OP_RESPONSE)
            break;
    }
    const char *msg = "hello from the vsock probe\n";
    send_packet(GUEST_CONNECT_SRC_PORT, connect_port, OP_RW, 0, msg, (uint32_t)strlen(msg));
    send_packet(GUEST_CONNECT_SRC_PORT, connect_port, OP_SHUTDOWN, 3, 0, 0);
    for (;;) {
        if (recv_packet(&h, data)) {
            put_line("PROBE vsock FAIL no RST after our SHUTDOWN");
            return 1;
        }
        if (h.dst_port == GUEST_CONNECT_SRC_PORT && h.op == OP_RST)
            break;
    }
    put_line("guest-initiated stream done");
    put_line("PROBE vsock OK");
    return 0;
}

/* virtio_vsock.h — virtio-vsock (device id 19) in Firecracker's hybrid form: the guest
 * talks AF_VSOCK, the host talks AF_UNIX.
 *  - host -> guest: connect to uds_path, write "CONNECT <port>\n"; once the guest accepts,
 *    read "OK <host_port>\n", then the stream is bridged;
 *  - guest -> host: a guest connection to CID 2 port P is bridged to "<uds_path>_<P>".
 * Host-side connections cannot survive a restore: a restored device sends the guest a
 * transport reset event (as Firecracker does), so its driver drops every connection and
 * re-reads its CID (the restore config's). Two things keep a new host connection from being
 * taken for one of those dead ones:
 *  - the snapshot keeps the next host port (sm_vsock_state): the guest's dead sockets hold
 *    the ports handed out before, and a REQUEST on the same port pair would reach one of
 *    them (Linux answers it with RST, or drops it) instead of the listener;
 *  - host CONNECTs wait until the guest has handled the reset: Linux resets every socket in
 *    its connected table when its event work runs, which may come after a new connection
 *    was accepted, so that one would be reset too. The work re-posts the event buffer and
 *    notifies the event queue after the reset: that notify releases the held CONNECTs. */
#ifndef SM_VIRTIO_VSOCK_H
#define SM_VIRTIO_VSOCK_H

#include <stdint.h>
#include "virtio_mmio.h"

struct sm_event_loop;

#define SM_VIRTIO_ID_VSOCK 19
#define SM_VSOCK_RX_INDEX 0
#define SM_VSOCK_TX_INDEX 1
#define SM_VSOCK_EVENT_INDEX 2
#define SM_VSOCK_NUM_QUEUES 3
#define SM_VSOCK_HOST_CID 2
#define SM_VSOCK_HEADER_BYTES 44
#define SM_VSOCK_TYPE_STREAM 1
#define SM_VSOCK_OP_REQUEST 1
#define SM_VSOCK_OP_RESPONSE 2
#define SM_VSOCK_OP_RST 3
#define SM_VSOCK_OP_SHUTDOWN 4
#define SM_VSOCK_OP_RW 5
#define SM_VSOCK_OP_CREDIT_UPDATE 6
#define SM_VSOCK_OP_CREDIT_REQUEST 7
#define SM_VSOCK_SHUTDOWN_RCV 1
#define SM_VSOCK_SHUTDOWN_SEND 2
#define SM_VSOCK_MAX_CONNECTIONS 64
#define SM_VSOCK_CONN_BUF_BYTES (256u * 1024u)    /* our buf_alloc per connection */
#define SM_VSOCK_MAX_RW_PAYLOAD_BYTES (64u * 1024u)
#define SM_VSOCK_FIRST_HOST_PORT (1u << 30)     /* local ports for host-initiated streams */
#define SM_VSOCK_CONNECT_LINE_MAX_BYTES 32
#define SM_VSOCK_EVENT_TRANSPORT_RESET 0        /* struct virtio_vsock_event id */
#define SM_VSOCK_EVENT_BYTES 4

typedef enum sm_vsock_error {
    SM_VSOCK_ERR_NONE = 0,
    SM_VSOCK_ERR_QUEUE,
    SM_VSOCK_ERR_TX_HEADER_TOO_SHORT,
    SM_VSOCK_ERR_TX_LEN_BEYOND_BUFFER,
    SM_VSOCK_ERR_TX_BUFFER_WRITABLE,
    SM_VSOCK_ERR_RX_BUFFER_TOO_SMALL,
    SM_VSOCK_ERR_EVENT_BUFFER_TOO_SMALL,
    SM_VSOCK_ERR_COUNT
} sm_vsock_error;

const char *sm_vsock_error_message(int err);

typedef struct sm_vsock_counters {
    uint64_t tx_packets;                /* guest -> device */
    uint64_t rx_packets;                /* device -> guest */
    uint64_t tx_payload_bytes;
    uint64_t rx_payload_bytes;
    uint64_t host_connections_accepted;
    uint64_t host_connect_lines_malformed;
    uint64_t guest_connection_requests;
    uint64_t guest_connect_failures;    /* no listener at <uds_path>_<port> */
    uint64_t resets_sent;
    uint64_t resets_received;
    uint64_t packets_dropped;           /* wrong CID/type, unknown connection */
    uint64_t credit_violations;         /* guest sent more than we granted */
    uint64_t connections_table_full;
    uint64_t active_connections;
    uint64_t transport_resets;          /* restores: each owes the guest a reset event */
    uint64_t events_sent;               /* events delivered on the event queue */
    uint64_t transport_resets_handled;  /* the guest notified the event queue after one */
    uint64_t host_connects_held;        /* CONNECTs that waited for the guest to handle one */
} sm_vsock_counters;

/* The device's own snapshot record. */
typedef struct sm_vsock_state {
    uint32_t next_host_port;
    uint32_t pad;
} sm_vsock_state;

typedef struct sm_vsock sm_vsock;

extern const sm_virtio_ops SM_VSOCK_OPS;

sm_vsock *sm_vsock_create(const char *uds_path, uint32_t guest_cid, char *err, size_t err_len);
/* Binds the mux socket and registers it with the event loop. */
int sm_vsock_attach(sm_vsock *v, sm_virtio_mmio *t, struct sm_event_loop *loop, char *err, size_t err_len);

#endif

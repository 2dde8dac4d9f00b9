/* probe_vsock.h — a guest vsock stack for probes: one virtio-vsock device driven the way
 * Linux's virtio_transport and af_vsock drive it. Stream connections only:
 *  - listen on ports; a host REQUEST to a listening port is answered with RESPONSE at once
 *    and waits in the backlog until accepted, even if the peer closes it meanwhile (like
 *    Linux's accept queue); one to any other port, or past the connection table, gets RST;
 *  - connect to host ports;
 *  - send and receive with credit: a connection never sends past the peer's buf_alloc, and
 *    tells the peer (CREDIT_UPDATE) when it has read enough to matter;
 *  - the peer's SHUTDOWN or RST closes a connection (RST answers a SHUTDOWN); what it sent
 *    before stays readable;
 *  - event queue: buffers stay posted; a transport reset (the host restored a snapshot)
 *    closes every connection without a word to the host, which no longer knows them,
 *    re-reads the guest CID, and keeps the listening ports listening (it says so on COM1).
 * Nothing blocks: vsock_poll() takes in what the device delivered, vsock_wait() halts until
 * it delivers more. Connections are small integer handles. */
#ifndef SM_PROBE_VSOCK_H
#define SM_PROBE_VSOCK_H

#include <stddef.h>
#include <stdint.h>

#define VSOCK_HOST_CID 2
#define VSOCK_MAX_CONNECTIONS 4
#define VSOCK_MAX_LISTENERS 2
#define VSOCK_RX_BUF_ALLOC_BYTES 65536u /* per connection: what the peer may have in flight */

enum vsock_state {
    VSOCK_CONNECTING,   /* our REQUEST is out */
    VSOCK_ESTABLISHED,
    VSOCK_CLOSING,      /* our SHUTDOWN is out, the peer's RST is due */
    VSOCK_CLOSED,       /* reset, refused, shut down by the peer, or a transport reset */
};

/* Finds the device, negotiates, sets up its queues and posts every buffer. NULL on
 * success, else what went wrong. */
const char *vsock_init(void);
uint64_t vsock_guest_cid(void);

/* 0, or -1 when every listener slot is taken. */
int vsock_listen(uint32_t port);
/* The oldest connection waiting on port, now the caller's; -1 if none waits. */
int vsock_accept(uint32_t port);
/* Sends REQUEST from a fresh local port; -1 when the connection table is full. */
int vsock_connect(uint32_t host_port);

enum vsock_state vsock_state(int conn);
uint32_t vsock_peer_port(int conn);
/* Copies up to len received bytes; 0 when none are buffered. */
size_t vsock_recv(int conn, void *buf, size_t len);
/* Sends what the peer's credit allows now (0 … len bytes; 0 on a connection that is not
 * established). */
size_t vsock_send(int conn, const void *buf, size_t len);
/* Sends all of it, waiting for the peer's credit; -1 once the connection is not established. */
int vsock_send_all(int conn, const void *buf, size_t len);
/* Full shutdown (both directions); the connection is CLOSED when the peer's RST comes. */
void vsock_shutdown(int conn);
/* Frees the handle; a connection the peer still knows is reset first. */
void vsock_close(int conn);

/* Handles every packet and event the device has delivered; returns how many. */
int vsock_poll(void);
/* Returns at once if the device has delivered something, else halts until it does. */
void vsock_wait(void);

#endif

/* vsock probe: the guest vsock stack (probe_vsock.c) against the core's hybrid vsock.
 * 1. listens on port listen= (default 1234): accepts the host's connection, echoes every
 *    byte upper-cased until the host closes it (the stack answers its SHUTDOWN with RST);
 * 2. connects to host port connect= (default 5000): waits for the RESPONSE, sends one line,
 *    shuts down, waits for the host's RST;
 * then reports. It waits for the host by polling, giving up after IDLE_LIMIT_NS of guest time
 * without progress (sending waits for the host's credit in vsock_send_all()). Guest time, not a
 * spin count: kvmclock stands still while the VM is paused, snapshotted or not yet restored, so
 * a slow host (a sanitizer build, a loaded machine) never eats the guest's patience. */
#include "probe.h"
#include "probe_clock.h"
#include "probe_vsock.h"

#define IDLE_LIMIT_NS (120 * NS_PER_SECOND)

static uint64_t idle_polls;
static uint64_t idle_since_ns;
static uint8_t data[4096];

/* One round of polling; -1 once nothing arrived for IDLE_LIMIT_NS (PROBE_SPIN_LIMIT rounds
 * under a hypervisor without kvmclock). */
static int poll_once(void)
{
    if (vsock_poll()) {
        idle_polls = 0;
        return 0;
    }
    __asm__ volatile("pause");
    if (idle_polls++ == 0)
        idle_since_ns = clock_ns();
    uint64_t now_ns = clock_ns();
    if (now_ns)
        return now_ns - idle_since_ns > IDLE_LIMIT_NS ? -1 : 0;
    return idle_polls > PROBE_SPIN_LIMIT ? -1 : 0;
}

int probe_main(void)
{
    uint32_t listen_port = (uint32_t)cmdline_get_u64("listen", 1234);
    uint32_t connect_port = (uint32_t)cmdline_get_u64("connect", 5000);
    const char *error = vsock_init();
    if (error) {
        put_str("PROBE vsock FAIL ");
        put_line(error);
        return 1;
    }
    vsock_listen(listen_port);
    put_str("VSOCK ready cid=");
    put_dec(vsock_guest_cid());
    put_str(" listening on ");
    put_dec(listen_port);
    put_char('\n');

    int conn;
    while ((conn = vsock_accept(listen_port)) < 0) {
        if (poll_once()) {
            put_line("PROBE vsock FAIL timed out waiting for the host");
            return 1;
        }
    }
    put_str("accepted host port ");
    put_dec(vsock_peer_port(conn));
    put_char('\n');
    uint64_t echoed = 0;
    for (;;) {
        size_t n = vsock_recv(conn, data, sizeof(data));
        if (n) {
            for (size_t i = 0; i < n; i++)
                if (data[i] >= 'a' && data[i] <= 'z')
                    data[i] = (uint8_t)(data[i] - 'a' + 'A');
            if (vsock_send_all(conn, data, n))
                break;
            echoed += n;
            continue;
        }
        if (vsock_state(conn) != VSOCK_ESTABLISHED)
            break;
        if (poll_once()) {
            put_line("PROBE vsock FAIL timed out waiting for the host");
            return 1;
        }
    }
    vsock_close(conn);
    put_str("echoed bytes ");
    put_dec(echoed);
    put_char('\n');

    /* Guest-initiated stream. */
    conn = vsock_connect(connect_port);
    while (vsock_state(conn) == VSOCK_CONNECTING) {
        if (poll_once()) {
            put_line("PROBE vsock FAIL no answer to our REQUEST");
            return 1;
        }
    }
    if (vsock_state(conn) != VSOCK_ESTABLISHED) {
        put_line("PROBE vsock FAIL host refused our connection (RST)");
        return 1;
    }
    const char *msg = "hello from the vsock probe\n";
    vsock_send_all(conn, msg, strlen(msg));
    vsock_shutdown(conn);
    while (vsock_state(conn) == VSOCK_CLOSING) {
        if (poll_once()) {
            put_line("PROBE vsock FAIL no RST after our SHUTDOWN");
            return 1;
        }
    }
    vsock_close(conn);
    put_line("guest-initiated stream done");
    put_line("PROBE vsock OK");
    return 0;
}

/* uart8250.c — 16550A subset: THR/RBR, IER, IIR/FCR, LCR, MCR (loopback), LSR, MSR, SCR,
 * divisor latch. Enough for Linux's early printk, the 8250 driver's autoconfig and
 * probe guests. Guest writes land in a ring buffer read by the host. */
#define _GNU_SOURCE
#include "uart8250.h"

#include <stdlib.h>
#include <string.h>

#define UART_RBR_THR_OFFSET 0
#define UART_IER_OFFSET 1
#define UART_IIR_FCR_OFFSET 2
#define UART_LCR_OFFSET 3
#define UART_MCR_OFFSET 4
#define UART_LSR_OFFSET 5
#define UART_MSR_OFFSET 6
#define UART_SCR_OFFSET 7

#define UART_LCR_DLAB 0x80
#define UART_IER_RDI 0x01
#define UART_IER_THRI 0x02
#define UART_IIR_NO_INTERRUPT 0x01
#define UART_IIR_THRI 0x02
#define UART_IIR_RDI 0x04
#define UART_IIR_FIFO_ENABLED 0xc0
#define UART_FCR_FIFO_ENABLE 0x01
#define UART_LSR_DATA_READY 0x01
#define UART_LSR_THR_EMPTY 0x20
#define UART_LSR_TRANSMITTER_EMPTY 0x40
#define UART_MCR_LOOPBACK 0x10
#define UART_MSR_DCD 0x80
#define UART_MSR_DSR 0x20
#define UART_MSR_CTS 0x10

sm_uart *sm_uart_create(uint16_t base_port, sm_irq_line irq)
{
    sm_uart *u = calloc(1, sizeof(*u));
    if (!u)
        return NULL;
    u->ring = malloc(SM_CONSOLE_RING_BYTES);
    if (!u->ring) {
        free(u);
        return NULL;
    }
    u->base_port = base_port;
    u->irq = irq;
    u->msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS;
    u->dll = 0x0c; /* 9600 baud, like a PC at reset */
    pthread_mutex_init(&u->lock, NULL);
    return u;
}

void sm_uart_destroy(sm_uart *u)
{
    if (!u)
        return;
    pthread_mutex_destroy(&u->lock);
    free(u->ring);
    free(u);
}

static void ring_append_locked(sm_uart *u, const uint8_t *buf, size_t len)
{
    for (size_t i = 0; i < len; i++)
        u->ring[(u->ring_total + i) % SM_CONSOLE_RING_BYTES] = buf[i];
    __atomic_store_n(&u->ring_total, u->ring_total + len, __ATOMIC_RELEASE);
}

/* Recompute the interrupt condition; returns nonzero if IRQ should be raised. */
static int interrupt_pending_locked(sm_uart *u)
{
    if ((u->ier & UART_IER_RDI) && u->rx_len)
        return 1;
    if ((u->ier & UART_IER_THRI) && u->thr_interrupt_pending)
        return 1;
    return 0;
}

static uint8_t iir_locked(sm_uart *u)
{
    uint8_t fifo = (u->fcr & UART_FCR_FIFO_ENABLE) ? UART_IIR_FIFO_ENABLED : 0;
    if ((u->ier & UART_IER_RDI) && u->rx_len)
        return fifo | UART_IIR_RDI;
    if ((u->ier & UART_IER_THRI) && u->thr_interrupt_pending)
        return fifo | UART_IIR_THRI;
    return fifo | UART_IIR_NO_INTERRUPT;
}

static int rx_push_locked(sm_uart *u, uint8_t byte)
{
    if (u->rx_len >= SM_UART_RX_FIFO_BYTES)
        return 0;
    u->rx[(u->rx_head + u->rx_len) % SM_UART_RX_FIFO_BYTES] = byte;
    u->rx_len++;
    return 1;
}

void sm_uart_pio(sm_uart *u, uint16_t offset, uint8_t *data, int is_write)
{
    int raise = 0;
    pthread_mutex_lock(&u->lock);
    int dlab = (u->lcr & UART_LCR_DLAB) != 0;
    if (is_write) {
        uint8_t v = *data;
        switch (offset) {
        case UART_RBR_THR_OFFSET:
            if (dlab) {
                u->dll = v;
            } else if (u->mcr & UART_MCR_LOOPBACK) {
                rx_push_locked(u, v);
                raise = interrupt_pending_locked(u);
            } else {
                ring_append_locked(u, &v, 1);
                u->counters.tx_bytes++;
                u->thr_interrupt_pending = 1; /* transmit is instantaneous */
                raise = interrupt_pending_locked(u);
            }
            break;
        case UART_IER_OFFSET:
            if (dlab) {
                u->dlm = v;
            } else {
                uint8_t old = u->ier;
                u->ier = v & 0x0f;
                if ((u->ier & UART_IER_THRI) && !(old & UART_IER_THRI))
                    u->thr_interrupt_pending = 1;
                raise = interrupt_pending_locked(u);
            }
            break;
        case UART_IIR_FCR_OFFSET:
            u->fcr = v;
            break;
        case UART_LCR_OFFSET:
            u->lcr = v;
            break;
        case UART_MCR_OFFSET:
            u->mcr = v & 0x1f;
            break;
        case UART_SCR_OFFSET:
            u->scr = v;
            break;
        default: /* LSR and MSR are read-only; writes are ignored like on hardware */
            break;
        }
    } else {
        uint8_t v = 0;
        switch (offset) {
        case UART_RBR_THR_OFFSET:
            if (dlab) {
                v = u->dll;
            } else if (u->rx_len) {
                v = u->rx[u->rx_head];
                u->rx_head = (u->rx_head + 1) % SM_UART_RX_FIFO_BYTES;
                u->rx_len--;
                u->counters.rx_bytes++;
            }
            break;
        case UART_IER_OFFSET:
            v = dlab ? u->dlm : u->ier;
            break;
        case UART_IIR_FCR_OFFSET:
            v = iir_locked(u);
            if ((v & 0x0f) == UART_IIR_THRI)
                u->thr_interrupt_pending = 0; /* reading IIR clears the THRE interrupt */
            break;
        case UART_LCR_OFFSET:
            v = u->lcr;
            break;
        case UART_MCR_OFFSET:
            v = u->mcr;
            break;
        case UART_LSR_OFFSET:
            v = UART_LSR_THR_EMPTY | UART_LSR_TRANSMITTER_EMPTY | (u->rx_len ? UART_LSR_DATA_READY : 0);
            break;
        case UART_MSR_OFFSET:
            if (u->mcr & UART_MCR_LOOPBACK) {
                /* loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD */
                v = (uint8_t)(((u->mcr & 0x01) << 5) | ((u->mcr & 0x02) << 3) |
                              ((u->mcr & 0x04) << 4) | ((u->mcr & 0x08) << 4));
            } else {
                v = u->msr;
            }
            break;
        case UART_SCR_OFFSET:
            v = u->scr;
            break;
        default:
            v = 0xff;
        }
        *data = v;
    }
    if (raise)
        u->counters.interrupts++;
    pthread_mutex_unlock(&u->lock);
    if (raise)
        sm_irq_line_pulse(&u->irq);
}

int sm_uart_input(sm_uart *u, const uint8_t *buf, size_t len)
{
    int accepted = 0;
    pthread_mutex_lock(&u->lock);
    for (size_t i = 0; i < len; i++) {
        if (!rx_push_locked(u, buf[i])) {
            u->counters.rx_dropped_bytes += len - i;
            break;
        }
        accepted++;
    }
    int raise = accepted && interrupt_pending_locked(u);
    if (raise)
        u->counters.interrupts++;
    pthread_mutex_unlock(&u->lock);
    if (raise)
        sm_irq_line_pulse(&u->irq);
    return accepted;
}

size_t sm_uart_output_read(sm_uart *u, uint8_t *buf, size_t len, uint64_t *cursor, uint64_t *lost)
{
    pthread_mutex_lock(&u->lock);
    uint64_t total = u->ring_total;
    uint64_t start = *cursor;
    uint64_t skipped = 0;
    if (start > total)
        start = total;
    if (total - start > SM_CONSOLE_RING_BYTES) {
        skipped = total - SM_CONSOLE_RING_BYTES - start;
        start = total - SM_CONSOLE_RING_BYTES;
    }
    uint64_t avail = total - start;
    size_t n = avail < len ? (size_t)avail : len;
    for (size_t i = 0; i < n; i++)
        buf[i] = u->ring[(start + i) % SM_CONSOLE_RING_BYTES];
    pthread_mutex_unlock(&u->lock);
    *cursor = start + n;
    if (lost)
        *lost = skipped;
    return n;
}

uint64_t sm_uart_output_total(sm_uart *u)
{
    return __atomic_load_n(&u->ring_total, __ATOMIC_ACQUIRE);
}

void sm_uart_output_append(sm_uart *u, const uint8_t *buf, size_t len)
{
    pthread_mutex_lock(&u->lock);
    ring_append_locked(u, buf, len);
    u->counters.host_note_bytes += len;
    pthread_mutex_unlock(&u->lock);
}

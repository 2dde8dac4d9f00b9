/* uart8250.h — 16550-compatible UART at COM1 (0x3f8, IRQ 4); output into a ring buffer. */
#ifndef SM_UART8250_H
#define SM_UART8250_H

#include <pthread.h>
#include <stdint.h>
#include <stddef.h>
#include "device.h"

#define SM_UART_REGISTER_COUNT 8
#define SM_CONSOLE_RING_BYTES (1024 * 1024)
#define SM_UART_RX_FIFO_BYTES 4096

typedef struct sm_uart_counters {
    uint64_t tx_bytes;          /* bytes the guest wrote to THR */
    uint64_t rx_bytes;          /* bytes the guest read from RBR */
    uint64_t rx_dropped_bytes;  /* host input refused because the RX FIFO was full */
    uint64_t interrupts;        /* IRQ 4 pulses */
    uint64_t host_note_bytes;   /* bytes of "[supermachine] ..." notes appended */
} sm_uart_counters;

typedef struct sm_uart {
    uint16_t base_port;
    sm_irq_line irq;            /* the line it raises (COM1: IRQ 4) */
    pthread_mutex_t lock;
    /* registers */
    uint8_t ier, lcr, mcr, lsr_extra, msr, scr, dll, dlm, fcr;
    int thr_interrupt_pending;
    /* RX FIFO (host -> guest) */
    uint8_t rx[SM_UART_RX_FIFO_BYTES];
    uint32_t rx_head, rx_len;
    /* console ring (guest -> host): ring[total % size] */
    uint8_t *ring;
    uint64_t ring_total;
    sm_uart_counters counters;
} sm_uart;

sm_uart *sm_uart_create(uint16_t base_port, sm_irq_line irq);
void sm_uart_destroy(sm_uart *u);
void sm_uart_pio(sm_uart *u, uint16_t offset, uint8_t *data, int is_write);
int sm_uart_input(sm_uart *u, const uint8_t *buf, size_t len);
size_t sm_uart_output_read(sm_uart *u, uint8_t *buf, size_t len, uint64_t *cursor, uint64_t *lost);
uint64_t sm_uart_output_total(sm_uart *u);
void sm_uart_output_append(sm_uart *u, const uint8_t *buf, size_t len);

#endif

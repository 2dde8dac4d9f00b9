/* i8042.h — the PC keyboard controller at ports 0x60 (data) and 0x64 (status/command), with a
 * keyboard that answers but never types and nothing on the mouse port. Enough of it for Linux's
 * i8042 and atkbd drivers to find it at once (a stub made them wait ~2 s and give up) and for
 * psmouse to see no mouse at once, and for a guest to reset the machine through it (command
 * 0xFE, or the output port's reset bit). */
#ifndef SM_I8042_H
#define SM_I8042_H

#include <pthread.h>
#include <stdint.h>
#include "device.h"

#define SM_I8042_DATA_PORT 0x60
#define SM_I8042_COMMAND_PORT 0x64
#define SM_I8042_KEYBOARD_IRQ 1
#define SM_I8042_MOUSE_IRQ 12

/* Controller commands (written to 0x64). */
#define SM_I8042_CMD_READ_CTR 0x20
#define SM_I8042_CMD_WRITE_CTR 0x60
#define SM_I8042_CMD_DISABLE_AUX 0xa7
#define SM_I8042_CMD_ENABLE_AUX 0xa8
#define SM_I8042_CMD_TEST_AUX 0xa9
#define SM_I8042_CMD_SELF_TEST 0xaa
#define SM_I8042_CMD_TEST_KBD 0xab
#define SM_I8042_CMD_DISABLE_KBD 0xad
#define SM_I8042_CMD_ENABLE_KBD 0xae
#define SM_I8042_CMD_READ_INPUT_PORT 0xc0
#define SM_I8042_CMD_READ_OUTPUT_PORT 0xd0
#define SM_I8042_CMD_WRITE_OUTPUT_PORT 0xd1
#define SM_I8042_CMD_WRITE_KBD_OUTPUT 0xd2
#define SM_I8042_CMD_WRITE_AUX_OUTPUT 0xd3   /* Linux's "AUX loop" */
#define SM_I8042_CMD_WRITE_TO_AUX 0xd4
#define SM_I8042_CMD_RESET_CPU 0xfe

/* Status register (read from 0x64). */
#define SM_I8042_STR_OBF 0x01          /* a byte waits in the output buffer */
#define SM_I8042_STR_SYS 0x04          /* set by a passed self test */
#define SM_I8042_STR_CMD 0x08          /* the last write went to 0x64 */
#define SM_I8042_STR_UNLOCKED 0x10     /* keyboard not inhibited */
#define SM_I8042_STR_AUXDATA 0x20      /* the waiting byte comes from the mouse port */
#define SM_I8042_STR_TIMEOUT 0x40      /* no device answered */

/* Controller configuration byte (the "CTR", commands 0x20/0x60). */
#define SM_I8042_CTR_KBDINT 0x01
#define SM_I8042_CTR_AUXINT 0x02
#define SM_I8042_CTR_SYS 0x04
#define SM_I8042_CTR_KBDDIS 0x10
#define SM_I8042_CTR_AUXDIS 0x20

#define SM_I8042_SELF_TEST_PASSED 0x55
#define SM_I8042_PORT_TEST_PASSED 0x00
#define SM_I8042_OUTPUT_PORT_RESET_HIGH 0x01  /* output port bit 0 low resets the CPU */
/* Keyboard answers, and the byte a port with no device gives (with STR_TIMEOUT). */
#define SM_PS2_ACK 0xfa
#define SM_PS2_SELF_TEST_PASSED 0xaa
#define SM_PS2_ECHO 0xee
#define SM_PS2_NO_DEVICE 0xfe

/* Bytes waiting for the guest: a controller answer and a device's reply fit many times. */
#define SM_I8042_QUEUE_BYTES 16

typedef struct sm_i8042_counters {
    uint64_t reads;            /* port reads */
    uint64_t writes;           /* port writes */
    uint64_t commands;         /* controller commands (0x64 writes) */
    uint64_t device_bytes;     /* bytes sent on to the keyboard or the (empty) mouse port */
    uint64_t interrupts;       /* IRQ 1 and IRQ 12 pulses */
    uint64_t dropped_bytes;    /* answers lost because the guest never read the queue */
    uint64_t reset_requests;
} sm_i8042_counters;

typedef struct sm_i8042 {
    sm_device_reporter reporter;   /* reset: the guest asked the controller to reset the CPU */
    sm_irq_line keyboard_irq, mouse_irq;
    pthread_mutex_t lock;
    uint8_t ctr;                   /* controller configuration byte */
    uint8_t status_flags;          /* SYS and CMD (OBF and AUXDATA follow the queue) */
    uint8_t output_port;
    uint8_t pending_command;       /* a controller command waiting for its data byte, or 0 */
    uint8_t keyboard_pending;      /* a keyboard command waiting for its parameter, or 0 */
    /* output queue: byte and the status bits it shows (AUXDATA, TIMEOUT), oldest at head */
    uint8_t queue[SM_I8042_QUEUE_BYTES];
    uint8_t queue_status[SM_I8042_QUEUE_BYTES];
    uint32_t head, len;
    sm_i8042_counters counters;    /* under lock */
} sm_i8042;

void sm_i8042_init(sm_i8042 *k, sm_irq_line keyboard_irq, sm_irq_line mouse_irq,
                   sm_device_reporter reporter);
void sm_i8042_destroy(sm_i8042 *k);
/* One byte of port I/O on 0x60 or 0x64. A reset request (0xFE to 0x64, or an output port
 * written with bit 0 low) is reported: the VM ends as a guest reboot. */
void sm_i8042_pio(sm_i8042 *k, uint16_t port, uint8_t *data, int is_write);

#endif

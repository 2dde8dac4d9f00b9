/* i8042.c — keyboard controller: configuration byte, self and port tests, port enables, the
 * output buffer (a short queue, one byte shown at a time as on the chip, each raising IRQ 1 or
 * 12 when the configuration byte enables it), the output port, a keyboard that acknowledges
 * every command and answers reset and identify as a real one does, and an empty mouse port. */
#include "i8042.h"

#include <string.h>

#define CTR_POWER_ON (SM_I8042_CTR_KBDINT | SM_I8042_CTR_SYS)
#define OUTPUT_PORT_POWER_ON (SM_I8042_OUTPUT_PORT_RESET_HIGH | 0x02) /* A20 enabled */
#define INPUT_PORT_VALUE 0x80                  /* keyboard not locked */
#define PULSE_COMMANDS_FIRST 0xf0              /* 0xF0-0xFF pulse output port bits 0-3 low */
#define KBD_CMD_SET_LEDS 0xed
#define KBD_CMD_ECHO 0xee
#define KBD_CMD_SCANCODE_SET 0xf0
#define KBD_CMD_GET_ID 0xf2
#define KBD_CMD_TYPEMATIC 0xf3
#define KBD_CMD_RESET 0xff
#define KBD_ID_FIRST 0xab                      /* MF2 keyboard */
#define KBD_ID_SECOND 0x83
#define KBD_SCANCODE_SET 0x02

enum { NO_IRQ = 0, KEYBOARD = 1, MOUSE = 2 };

void sm_i8042_init(sm_i8042 *k, sm_irq_line keyboard_irq, sm_irq_line mouse_irq,
                   sm_device_reporter reporter)
{
    memset(k, 0, sizeof(*k));
    k->reporter = reporter;
    k->keyboard_irq = keyboard_irq;
    k->mouse_irq = mouse_irq;
    pthread_mutex_init(&k->lock, NULL);
    k->ctr = CTR_POWER_ON;
    k->status_flags = SM_I8042_STR_SYS;
    k->output_port = OUTPUT_PORT_POWER_ON;
}

void sm_i8042_destroy(sm_i8042 *k)
{
    pthread_mutex_destroy(&k->lock);
}

/* The interrupt the byte now shown in the output buffer raises, if the CTR enables it. */
static int head_interrupt_locked(const sm_i8042 *k)
{
    if (!k->len)
        return NO_IRQ;
    if (k->queue_status[k->head] & SM_I8042_STR_AUXDATA)
        return (k->ctr & SM_I8042_CTR_AUXINT) ? MOUSE : NO_IRQ;
    return (k->ctr & SM_I8042_CTR_KBDINT) ? KEYBOARD : NO_IRQ;
}

/* Queue an answer with the status bits it shows (AUXDATA: from the mouse port; TIMEOUT);
 * returns the interrupt to raise if it became the byte shown. */
static int push_locked(sm_i8042 *k, uint8_t byte, uint8_t status)
{
    if (k->len >= SM_I8042_QUEUE_BYTES) {
        k->counters.dropped_bytes++;
        return NO_IRQ;
    }
    uint32_t tail = (k->head + k->len) % SM_I8042_QUEUE_BYTES;
    k->queue[tail] = byte;
    k->queue_status[tail] = status;
    k->len++;
    return k->len == 1 ? head_interrupt_locked(k) : NO_IRQ;
}

static int push_keyboard(sm_i8042 *k, uint8_t byte) { return push_locked(k, byte, 0); }

/* Several keyboard answers in a row: the first one shown decides the interrupt. */
static int push_many(sm_i8042 *k, const uint8_t *bytes, size_t n)
{
    int irq = NO_IRQ;
    for (size_t i = 0; i < n; i++) {
        int got = push_locked(k, bytes[i], 0);
        if (irq == NO_IRQ)
            irq = got;
    }
    return irq;
}

static void request_reset(sm_i8042 *k, const char *why)
{
    k->counters.reset_requests++;
    sm_device_report_reset(&k->reporter, why);
}

static int keyboard_byte(sm_i8042 *k, uint8_t v)
{
    k->counters.device_bytes++;
    if (k->keyboard_pending) {                 /* the parameter of the command before */
        int query_set = k->keyboard_pending == KBD_CMD_SCANCODE_SET && v == 0;
        k->keyboard_pending = 0;
        const uint8_t set[] = {SM_PS2_ACK, KBD_SCANCODE_SET};
        return push_many(k, set, query_set ? 2 : 1);
    }
    switch (v) {
    case KBD_CMD_SET_LEDS:
    case KBD_CMD_SCANCODE_SET:
    case KBD_CMD_TYPEMATIC:
        k->keyboard_pending = v;
        return push_keyboard(k, SM_PS2_ACK);
    case KBD_CMD_ECHO:
        return push_keyboard(k, SM_PS2_ECHO);
    case KBD_CMD_GET_ID: {
        const uint8_t id[] = {SM_PS2_ACK, KBD_ID_FIRST, KBD_ID_SECOND};
        return push_many(k, id, sizeof(id));
    }
    case KBD_CMD_RESET: {
        const uint8_t bat[] = {SM_PS2_ACK, SM_PS2_SELF_TEST_PASSED};
        return push_many(k, bat, sizeof(bat));
    }
    default:
        return push_keyboard(k, SM_PS2_ACK);
    }
}

/* Nothing is plugged into the mouse port: a byte sent to it times out, as on a PC without a
 * mouse, so Linux's psmouse gives up at its first command instead of probing for protocols. */
static int mouse_byte(sm_i8042 *k, uint8_t v)
{
    (void)v;
    k->counters.device_bytes++;
    return push_locked(k, SM_PS2_NO_DEVICE, SM_I8042_STR_AUXDATA | SM_I8042_STR_TIMEOUT);
}

/* A byte written to 0x64. Returns the interrupt to raise. */
static int controller_command(sm_i8042 *k, uint8_t cmd)
{
    k->counters.commands++;
    k->pending_command = 0;
    switch (cmd) {
    case SM_I8042_CMD_READ_CTR:
        return push_keyboard(k, k->ctr);
    case SM_I8042_CMD_WRITE_CTR:
    case SM_I8042_CMD_WRITE_OUTPUT_PORT:
    case SM_I8042_CMD_WRITE_KBD_OUTPUT:
    case SM_I8042_CMD_WRITE_AUX_OUTPUT:
    case SM_I8042_CMD_WRITE_TO_AUX:
        k->pending_command = cmd;             /* its data byte comes through 0x60 */
        return NO_IRQ;
    case SM_I8042_CMD_DISABLE_AUX:
        k->ctr |= SM_I8042_CTR_AUXDIS;
        return NO_IRQ;
    case SM_I8042_CMD_ENABLE_AUX:
        k->ctr &= (uint8_t)~SM_I8042_CTR_AUXDIS;
        return NO_IRQ;
    case SM_I8042_CMD_DISABLE_KBD:
        k->ctr |= SM_I8042_CTR_KBDDIS;
        return NO_IRQ;
    case SM_I8042_CMD_ENABLE_KBD:
        k->ctr &= (uint8_t)~SM_I8042_CTR_KBDDIS;
        return NO_IRQ;
    case SM_I8042_CMD_TEST_AUX:
    case SM_I8042_CMD_TEST_KBD:
        return push_keyboard(k, SM_I8042_PORT_TEST_PASSED);
    case SM_I8042_CMD_SELF_TEST:
        k->status_flags |= SM_I8042_STR_SYS;
        return push_keyboard(k, SM_I8042_SELF_TEST_PASSED);
    case SM_I8042_CMD_READ_INPUT_PORT:
        return push_keyboard(k, INPUT_PORT_VALUE);
    case SM_I8042_CMD_READ_OUTPUT_PORT:
        return push_keyboard(k, k->output_port);
    default:
        if (cmd >= PULSE_COMMANDS_FIRST && !(cmd & SM_I8042_OUTPUT_PORT_RESET_HIGH))
            request_reset(k, "guest reset the machine through the i8042 (reboot)");
        return NO_IRQ;                        /* other commands: nothing to answer */
    }
}

/* A byte written to 0x60: a controller command's data, else a byte for the keyboard. */
static int data_byte(sm_i8042 *k, uint8_t v)
{
    uint8_t cmd = k->pending_command;
    k->pending_command = 0;
    switch (cmd) {
    case SM_I8042_CMD_WRITE_CTR: {
        int was = head_interrupt_locked(k);
        k->ctr = v;
        int now = head_interrupt_locked(k);
        return now != was ? now : NO_IRQ;     /* a waiting byte whose interrupt was enabled */
    }
    case SM_I8042_CMD_WRITE_OUTPUT_PORT:
        k->output_port = v;
        if (!(v & SM_I8042_OUTPUT_PORT_RESET_HIGH))
            request_reset(k, "guest reset the machine through the i8042 output port (reboot)");
        return NO_IRQ;
    case SM_I8042_CMD_WRITE_KBD_OUTPUT:
        return push_locked(k, v, 0);
    case SM_I8042_CMD_WRITE_AUX_OUTPUT:
        return push_locked(k, v, SM_I8042_STR_AUXDATA);
    case SM_I8042_CMD_WRITE_TO_AUX:
        return mouse_byte(k, v);
    default:
        return keyboard_byte(k, v);
    }
}

void sm_i8042_pio(sm_i8042 *k, uint16_t port, uint8_t *data, int is_write)
{
    int irq = NO_IRQ;
    pthread_mutex_lock(&k->lock);
    if (!is_write) {
        k->counters.reads++;
        if (port == SM_I8042_COMMAND_PORT) {
            uint8_t status = k->status_flags | SM_I8042_STR_UNLOCKED;
            if (k->len)
                status |= SM_I8042_STR_OBF | k->queue_status[k->head];
            *data = status;
        } else if (k->len) {
            *data = k->queue[k->head];
            k->head = (k->head + 1) % SM_I8042_QUEUE_BYTES;
            k->len--;
            irq = head_interrupt_locked(k);   /* the next byte is shown */
        } else {
            *data = 0;                        /* nothing waits */
        }
    } else {
        k->counters.writes++;
        if (port == SM_I8042_COMMAND_PORT) {
            k->status_flags |= SM_I8042_STR_CMD;
            irq = controller_command(k, *data);
        } else {
            k->status_flags &= (uint8_t)~SM_I8042_STR_CMD;
            irq = data_byte(k, *data);
        }
    }
    if (irq != NO_IRQ)
        k->counters.interrupts++;
    pthread_mutex_unlock(&k->lock);
    /* Reset requests were reported under the lock: the reporter only ends the VM (it never
     * calls back into the device). Interrupts go out after it, like the UART's. */
    if (irq == KEYBOARD)
        sm_irq_line_pulse(&k->keyboard_irq);
    else if (irq == MOUSE)
        sm_irq_line_pulse(&k->mouse_irq);
}

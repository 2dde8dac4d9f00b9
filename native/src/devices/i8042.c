/* i8042.c — keyboard controller stub: status always "empty", reset command honoured. */
#include "i8042.h"

#include <string.h>

#define I8042_STATUS_EMPTY 0x00

void sm_i8042_init(sm_i8042 *k, sm_device_reporter reporter)
{
    memset(k, 0, sizeof(*k));
    k->reporter = reporter;
}

void sm_i8042_pio(sm_i8042 *k, uint16_t port, uint8_t *data, int is_write)
{
    if (!is_write) {
        k->counters.reads++;
        *data = I8042_STATUS_EMPTY;
        return;
    }
    k->counters.writes++;
    if (port == SM_I8042_COMMAND_PORT && *data == SM_I8042_CMD_RESET_CPU) {
        k->counters.reset_requests++;
        sm_device_report_reset(&k->reporter, "guest reset the machine through the i8042 (reboot)");
    }
}

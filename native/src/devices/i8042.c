/* i8042.c — keyboard controller stub: status always "empty", reset command honoured. */
#include "i8042.h"
#include "../sm_internal.h"

#define I8042_STATUS_EMPTY 0x00

void sm_i8042_pio(struct sm_vm *vm, sm_i8042_counters *c, uint16_t port, uint8_t *data,
                  int is_write)
{
    if (!is_write) {
        c->reads++;
        *data = I8042_STATUS_EMPTY;
        return;
    }
    c->writes++;
    if (port == SM_I8042_COMMAND_PORT && *data == SM_I8042_CMD_RESET_CPU) {
        c->reset_requests++;
        sm_vm_end(vm, SM_STATE_STOPPED, SM_EXIT_GUEST_RESET,
                  "guest reset the machine through the i8042 (reboot)");
    }
}

/* i8042.h — the bit of the PC keyboard controller a guest uses to reset the machine. */
#ifndef SM_I8042_H
#define SM_I8042_H

#include <stdint.h>
#include "device.h"

#define SM_I8042_DATA_PORT 0x60
#define SM_I8042_COMMAND_PORT 0x64
#define SM_I8042_CMD_RESET_CPU 0xfe

typedef struct sm_i8042_counters {
    uint64_t reads;
    uint64_t writes;
    uint64_t reset_requests;
} sm_i8042_counters;

typedef struct sm_i8042 {
    sm_device_reporter reporter;   /* reset: the guest wrote 0xFE to 0x64 */
    sm_i8042_counters counters;    /* updated under the vCPU exits; advisory */
} sm_i8042;

void sm_i8042_init(sm_i8042 *k, sm_device_reporter reporter);
/* Port I/O on 0x60/0x64. A 0xFE written to 0x64 asks the machine for a reset (the VM ends
 * cleanly: guest reboot). */
void sm_i8042_pio(sm_i8042 *k, uint16_t port, uint8_t *data, int is_write);

#endif

/* i8042.h — the bit of the PC keyboard controller a guest uses to reset the machine. */
#ifndef SM_I8042_H
#define SM_I8042_H

#include <stdint.h>

struct sm_vm;

#define SM_I8042_DATA_PORT 0x60
#define SM_I8042_COMMAND_PORT 0x64
#define SM_I8042_CMD_RESET_CPU 0xfe

typedef struct sm_i8042_counters {
    uint64_t reads;
    uint64_t writes;
    uint64_t reset_requests;
} sm_i8042_counters;

/* Port I/O on 0x60/0x64. A 0xFE written to 0x64 ends the VM cleanly (guest reboot). */
void sm_i8042_pio(struct sm_vm *vm, sm_i8042_counters *c, uint16_t port, uint8_t *data,
                  int is_write);

#endif

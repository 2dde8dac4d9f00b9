/* snapshot.h — the native core's snapshot format (state.bin + memory.bin in one directory).
 *
 * memory.bin: guest RAM, regions back to back (RAM below the MMIO hole, then above 4 GiB),
 * exactly memory_bytes long; all-zero pages are holes. Restores map it MAP_PRIVATE.
 * state.bin: sm_snapshot_header, then the payload: sm_snapshot_vm_state, n_vcpus times
 * sm_snapshot_vcpu_state, n_devices times sm_virtio_mmio_state (devices/virtio_mmio.h:
 * transport, queues and the device's own state), in device order, then each device's extra
 * state (extra_len bytes of its record, at most SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES; virtio-fs
 * keeps its FUSE session there), in device order, back to back. checksum is FNV-1a 64 over
 * the header (checksum field zero) and the payload. All host-endian (x86-64):
 * a snapshot is restored on the machine type that made it.
 */
#ifndef SM_SNAPSHOT_H
#define SM_SNAPSHOT_H

#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>

#include "../include/supermachine.h"

#define SM_SNAPSHOT_MAGIC "SMNSNAP"          /* 8 bytes with the NUL */
/* 2: virtio device records; 3: 32 MSRs, virtio GSIs skip 8, 12; 4: extra device state */
#define SM_SNAPSHOT_FORMAT_VERSION 4u
#define SM_SNAPSHOT_STATE_FILE "state.bin"
#define SM_SNAPSHOT_MEMORY_FILE "memory.bin"
#define SM_SNAPSHOT_MAX_MSRS 32
#define SM_SNAPSHOT_FLAG_XSAVE 1u             /* vcpu xsave/xcrs fields are valid */

/* Named errors of a restore: what is wrong with the snapshot. */
typedef enum sm_snapshot_error {
    SM_SNAPSHOT_OK = 0,
    SM_SNAPSHOT_ERR_OPEN,        /* state.bin or memory.bin cannot be opened */
    SM_SNAPSHOT_ERR_TRUNCATED,   /* a file is shorter than its header says */
    SM_SNAPSHOT_ERR_MAGIC,       /* not a native-core snapshot */
    SM_SNAPSHOT_ERR_VERSION,     /* written by another format version */
    SM_SNAPSHOT_ERR_LAYOUT,      /* sizes or counts out of range, or trailing bytes */
    SM_SNAPSHOT_ERR_CHECKSUM,    /* payload does not match its checksum: corrupted */
    SM_SNAPSHOT_ERR_MEMORY_SIZE, /* memory.bin length differs from the recorded size */
    SM_SNAPSHOT_ERR_DEVICE_LIST, /* the restore's devices are not the snapshot's */
    SM_SNAPSHOT_ERROR_COUNT
} sm_snapshot_error;

typedef struct sm_snapshot_header {
    char magic[8];
    uint32_t format_version;
    uint32_t header_bytes;
    uint64_t memory_bytes;
    uint32_t n_vcpus;
    uint32_t flags;
    uint64_t payload_bytes;
    uint64_t checksum;
    uint32_t n_devices;
    uint32_t device_record_bytes;   /* sizeof(sm_virtio_mmio_state) of the writer */
} sm_snapshot_header;

typedef struct sm_snapshot_uart_state {
    uint8_t ier, lcr, mcr, lsr_extra, msr, scr, dll, dlm, fcr, pad[7];
    int32_t thr_interrupt_pending;
    uint32_t rx_len;
    uint8_t rx[4096];             /* SM_UART_RX_FIFO_BYTES, unconsumed host input in order */
} sm_snapshot_uart_state;

typedef struct sm_snapshot_vm_state {
    struct kvm_irqchip pic_master;
    struct kvm_irqchip pic_slave;
    struct kvm_irqchip ioapic;
    struct kvm_pit_state2 pit;
    struct kvm_clock_data clock;
    sm_snapshot_uart_state uart;
} sm_snapshot_vm_state;

typedef struct sm_snapshot_vcpu_state {
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    struct kvm_fpu fpu;
    struct kvm_xsave xsave;
    struct kvm_xcrs xcrs;
    struct kvm_lapic_state lapic;
    struct kvm_mp_state mp_state;
    struct kvm_vcpu_events events;
    uint32_t n_msrs, pad;
    struct kvm_msr_entry msrs[SM_SNAPSHOT_MAX_MSRS];
} sm_snapshot_vcpu_state;

#endif

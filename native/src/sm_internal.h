/* sm_internal.h — the VM's internals, shared by vm.c, kvm.c, vcpu.c, boot_x86.c and
 * snapshot.c (never part of the C ABI). Devices never include it: they get what they need
 * through devices/device.h. */
#ifndef SM_INTERNAL_H
#define SM_INTERNAL_H

#include <pthread.h>
#include <stdint.h>
#include <stddef.h>
#include <linux/kvm.h>

#include "../include/supermachine.h"
#include "memory.h"
#include "devices/cmos_rtc.h"
#include "devices/i8042.h"

#define SM_VERSION_STRING "0.1.1"  /* bumped with the snapshot format: cache keys name it */

/* Guest physical layout (x86-64). */
#define SM_GDT_GPA 0x500ULL
#define SM_IDT_GPA 0x520ULL
#define SM_PVH_START_INFO_GPA 0x6000ULL
#define SM_PVH_MEMMAP_GPA 0x6100ULL
#define SM_PVH_MODLIST_GPA 0x6800ULL
#define SM_ZERO_PAGE_GPA 0x7000ULL
#define SM_PML4_GPA 0x9000ULL
#define SM_PDPT_GPA 0xa000ULL
#define SM_PD_GPA 0xb000ULL /* four 4 KiB page directories: 0xb000..0xefff */
#define SM_CMDLINE_GPA 0x20000ULL
#define SM_CMDLINE_MAX_BYTES 4096
#define SM_EBDA_START_GPA 0x9fc00ULL
#define SM_HIGH_MEMORY_START_GPA 0x100000ULL
#define SM_KERNEL_LOAD_GPA 0x100000ULL
#define SM_PROBE_STACK_TOP_GPA 0x1ff000ULL
#define SM_MMIO_HOLE_START_GPA 0xc0000000ULL  /* 3 GiB */
#define SM_MMIO_HOLE_END_GPA 0x100000000ULL   /* 4 GiB */
#define SM_VIRTIO_MMIO_BASE_GPA 0xd0000000ULL
#define SM_VIRTIO_MMIO_SLOT_BYTES 0x1000ULL
#define SM_VIRTIO_FIRST_IRQ 5  /* then upwards, skipping the legacy lines below (vm.c) */
#define SM_MAX_VIRTIO_DEVICES 12
#define SM_KVM_TSS_GPA 0xfffbd000ULL
#define SM_KVM_IDENTITY_MAP_GPA 0xfffbc000ULL

#define SM_COM1_PORT 0x3f8
#define SM_COM1_IRQ 4

/* The boot code tells the vCPU setup where and how to enter the guest. */
typedef enum sm_entry_mode {
    SM_ENTRY_LONG_MODE = 0,   /* 64-bit, paging on, identity mapped 4 GiB */
    SM_ENTRY_PVH_32 = 1       /* 32-bit protected mode, paging off (PVH) */
} sm_entry_mode;

typedef struct sm_boot_state {
    sm_entry_mode mode;
    uint64_t rip, rsp, rsi, rdi, rbx;
} sm_boot_state;

typedef struct sm_vcpu {
    struct sm_vm *vm;
    uint32_t index;
    int fd;
    struct kvm_run *run;
    pthread_t thread;
    int thread_started;
} sm_vcpu;

struct sm_uart;
struct sm_virtio_mmio;
struct sm_balloon;
struct sm_blk;
struct sm_vsock;
struct sm_event_loop;
struct sm_queue_doorbells;

struct sm_vm {
    int kvm_fd;
    int vm_fd;
    size_t run_mmap_bytes;
    sm_guest_memory mem;
    uint32_t n_vcpus;
    sm_vcpu vcpus[SM_MAX_VCPUS];
    struct kvm_cpuid2 *cpuid;
    sm_boot_state boot;
    int strict_unhandled_exits;
    int queue_notify_exits;    /* no ioeventfd doorbells (sm_vm_config) */

    pthread_mutex_t lock;      /* state, exit info, last_error, pause protocol */
    pthread_cond_t cond;
    int state;                 /* sm_vm_state */
    int stop_requested;
    int pause_requested;
    uint32_t vcpus_paused;
    uint32_t vcpus_running;
    sm_exit_info exit;
    char last_error[SM_ERROR_MESSAGE_BYTES];

    struct sm_uart *uart;
    sm_i8042 i8042;
    sm_cmos_rtc rtc;
    int legacy_devices_ready;  /* i8042 and rtc initialised (their locks exist) */
    struct sm_event_loop *loop;
    struct sm_virtio_mmio *virtio[SM_MAX_VIRTIO_DEVICES];
    struct sm_queue_doorbells *doorbells[SM_MAX_VIRTIO_DEVICES];   /* NULL: notifies exit */
    uint32_t n_virtio;
    struct sm_balloon *balloon;
    struct sm_vsock *vsock;

    char cmdline[SM_CMDLINE_MAX_BYTES];
    char virtio_fragment[1024];
};

/* vm.c */
void sm_vm_set_error(struct sm_vm *vm, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* End the VM (first caller wins): records the reason and message, kicks every vCPU. */
void sm_vm_end(struct sm_vm *vm, int state, int reason, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* End the VM with a fully filled exit record (vCPU fatal exits). */
void sm_vm_end_detail(struct sm_vm *vm, const sm_exit_info *detail, int state);
/* Non-strict unhandled access: count it and keep the first description. */
void sm_vm_flag_unhandled(struct sm_vm *vm, int is_mmio, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Append a host-side note ("[supermachine] ...") to the console ring. */
void sm_vm_console_note(struct sm_vm *vm, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
/* sm_vm_create with guest RAM mapped MAP_PRIVATE from memory_fd (>= 0: a snapshot's
 * memory.bin, no kernel load; the caller sets vCPU and irqchip state). memory_fd < 0 is plain
 * sm_vm_create. */
int sm_vm_create_internal(const sm_vm_config *c, int memory_fd, struct sm_vm **out, char *err,
                          size_t err_len);

/* kvm.c */
int sm_kvm_open(struct sm_vm *vm, char *err, size_t err_len);
int sm_kvm_setup_vm(struct sm_vm *vm, char *err, size_t err_len);
int sm_kvm_create_vcpus(struct sm_vm *vm, char *err, size_t err_len);

/* vcpu.c */
int sm_vcpu_configure(sm_vcpu *vcpu, char *err, size_t err_len);
int sm_vcpu_start_threads(struct sm_vm *vm, char *err, size_t err_len);
void sm_vcpu_kick_all(struct sm_vm *vm);
/* End the VM from inside an exit handler: on a vCPU thread RIP and instruction bytes are
 * recorded too. */
void sm_vcpu_fail_current(struct sm_vm *vm, int reason, const char *what);
void sm_vcpu_join_all(struct sm_vm *vm);

/* boot_x86.c */
int sm_boot_load(struct sm_vm *vm, const char *kernel_path, const char *initrd_path,
                 const char *cmdline, char *err, size_t err_len);
int sm_boot_write_page_tables(struct sm_vm *vm, char *err, size_t err_len);

/* io dispatch (vm.c) */
void sm_io_port(struct sm_vm *vm, uint16_t port, uint8_t *data, uint32_t size, int is_write);
void sm_io_mmio(struct sm_vm *vm, uint64_t gpa, uint8_t *data, uint32_t size, int is_write);

#endif

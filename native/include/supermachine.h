/*
 * supermachine.h — the whole C ABI of the supermachine native KVM core.
 *
 * This header doubles as the cffi cdef: native/build_native.py strips every line that
 * starts with '#' and hands the rest to ffibuilder.cdef(). So everything below the
 * includes is plain C declarations: typedefs, enums with explicit values, structs with
 * literal array sizes, functions. No macro is needed to use the API.
 *
 * Conventions
 *  - Functions returning int return SM_OK (0) on success or a negative sm_status.
 *    The message of the last failure of a VM call is read with sm_vm_last_error();
 *    sm_vm_create() writes its message into the caller's buffer (there is no VM yet).
 *  - Nothing the guest writes can make the core abort() or exit(): guest faults end or
 *    flag the VM (see sm_exit_reason) or flag a device as broken (see sm_device_info).
 *  - All sm_vm_* functions are thread-safe except sm_vm_destroy(), which must be the
 *    last call on a VM.
 */
#ifndef SUPERMACHINE_H
#define SUPERMACHINE_H
#include <stddef.h>
#include <stdint.h>

typedef struct sm_vm sm_vm;

/* Return codes. sm_status_name() gives the identifier, sm_last_error the details. */
typedef enum sm_status {
    SM_OK = 0,
    SM_ERR_INVALID_ARGUMENT = -1,
    SM_ERR_KVM_UNAVAILABLE = -2,
    SM_ERR_KVM_API_VERSION = -3,
    SM_ERR_KVM_MISSING_EXTENSION = -4,
    SM_ERR_KVM_IOCTL = -5,
    SM_ERR_OUT_OF_MEMORY = -6,
    SM_ERR_KERNEL_LOAD = -7,
    SM_ERR_INITRD_LOAD = -8,
    SM_ERR_DEVICE_SETUP = -9,
    SM_ERR_THREAD = -10,
    SM_ERR_BAD_STATE = -11,
    SM_ERR_NO_SUCH_DEVICE = -12,
    SM_ERR_VM_FAILED = -13,
    SM_ERR_TIMEOUT = -14
} sm_status;

/* Lifecycle. CREATED -> RUNNING <-> PAUSED -> STOPPED (clean end) or FAILED (error). */
typedef enum sm_vm_state {
    SM_STATE_CREATED = 0,
    SM_STATE_RUNNING = 1,
    SM_STATE_PAUSED = 2,
    SM_STATE_STOPPED = 3,
    SM_STATE_FAILED = 4
} sm_vm_state;

/* Why the VM ended (or SM_EXIT_NONE while it runs). */
typedef enum sm_exit_reason {
    SM_EXIT_NONE = 0,
    SM_EXIT_HOST_STOP = 1,          /* sm_vm_stop() */
    SM_EXIT_GUEST_RESET = 2,        /* i8042 reset (0xFE to port 0x64): guest "reboot" */
    SM_EXIT_TRIPLE_FAULT = 3,       /* KVM_EXIT_SHUTDOWN */
    SM_EXIT_INTERNAL_ERROR = 4,     /* KVM_EXIT_INTERNAL_ERROR, not an emulation failure */
    SM_EXIT_EMULATION_FAILURE = 5,  /* KVM_EXIT_INTERNAL_ERROR / EMULATION: rip + bytes */
    SM_EXIT_FAIL_ENTRY = 6,         /* KVM_EXIT_FAIL_ENTRY */
    SM_EXIT_UNHANDLED_IO = 7,       /* port I/O nobody owns (strict mode) */
    SM_EXIT_UNHANDLED_MMIO = 8,     /* MMIO nobody owns (strict mode) */
    SM_EXIT_UNKNOWN_KVM_EXIT = 9,   /* an exit reason the core does not know */
    SM_EXIT_KVM_RUN_ERROR = 10,     /* KVM_RUN itself failed */
    SM_EXIT_GUEST_HALT = 11         /* guest halted with interrupts off (no irqchip only) */
} sm_exit_reason;

typedef struct sm_blk_config {
    const char *path;   /* backing file (regular file; size must be a multiple of 512) */
    int read_only;      /* nonzero: VIRTIO_BLK_F_RO and the file is opened O_RDONLY */
    const char *serial; /* GET_ID answer (<= 20 bytes, /sys/block/vdX/serial); NULL: "sm-blk<n>" */
} sm_blk_config;

/* A virtio-fs share: the guest mounts `tag` and sees only what is beneath host_path (an
 * in-process FUSE passthrough; every lookup is openat2 RESOLVE_BENEATH from its parent). */
typedef struct sm_fs_config {
    const char *host_path;  /* an existing host directory */
    const char *tag;        /* 1..36 bytes, what `mount -t virtiofs <tag>` names */
    int read_only;          /* nonzero: WRITE, CREATE and write-opens fail with EROFS */
} sm_fs_config;

typedef struct sm_vm_config {
    uint32_t memory_mib;
    uint32_t vcpus;
    const char *kernel_path;  /* bzImage, PVH vmlinux, or a raw 64-bit ELF (probe) */
    const char *initrd_path;  /* may be NULL */
    const char *cmdline;      /* may be NULL; the virtio-mmio devices are appended */
    int balloon;              /* nonzero: add a virtio-balloon */
    int balloon_deflate_on_oom;
    uint32_t balloon_stats_interval_s;  /* 0: statistics queue not polled */
    sm_blk_config blk[8];     /* SM_MAX_BLK_DEVICES */
    uint32_t n_blk;
    const char *vsock_uds_path;  /* NULL: no vsock; else the hybrid-vsock mux socket */
    uint32_t vsock_guest_cid;    /* >= 3 */
    int strict_unhandled_exits;  /* nonzero: unhandled I/O or MMIO ends the VM */
    sm_fs_config fs[2];          /* SM_MAX_FS_DEVICES; devices "virtio-fs0", "virtio-fs1" */
    uint32_t n_fs;
    /* nonzero: no KVM ioeventfds, every virtio queue notify exits to the VMM (the fallback
     * when KVM lacks them; for tests and benchmarks). Counter "doorbell_notifications" says
     * how many notifies took the ioeventfd path. */
    int queue_notify_exits;
} sm_vm_config;

enum { SM_MAX_BLK_DEVICES = 8, SM_MAX_VCPUS = 32, SM_ERROR_MESSAGE_BYTES = 512 };
enum { SM_MAX_FS_DEVICES = 2 };

/* Filled by sm_vm_exit_info(): what ended the VM, and what it flagged while running. */
typedef struct sm_exit_info {
    int32_t state;            /* sm_vm_state */
    int32_t reason;           /* sm_exit_reason */
    uint32_t kvm_exit_reason; /* raw KVM_EXIT_* of the exit that ended the VM */
    uint32_t kvm_suberror;    /* KVM_INTERNAL_ERROR_* where relevant */
    uint32_t vcpu;            /* vCPU that ended it */
    uint64_t rip;             /* guest RIP (linear) at the fatal exit */
    uint8_t insn_bytes[16];   /* instruction bytes at the fatal exit, where known */
    uint32_t insn_len;
    uint64_t unhandled_io_count;    /* non-strict mode: exits answered with all-ones */
    uint64_t unhandled_mmio_count;
    char message[512];              /* human-readable, names the exit */
    char first_unhandled[256];      /* first unhandled I/O or MMIO access, if any */
} sm_exit_info;

/* Balloon statistics with Firecracker's field names. Memory fields are bytes, the
 * others counts. A field is valid only if bit (1 << SM_BALLOON_STAT_*) is in present. */
typedef struct sm_balloon_stats {
    uint32_t target_pages;
    uint32_t actual_pages;
    uint32_t target_mib;
    uint32_t actual_mib;
    uint64_t present;
    uint64_t swap_in;
    uint64_t swap_out;
    uint64_t major_faults;
    uint64_t minor_faults;
    uint64_t free_memory;
    uint64_t total_memory;
    uint64_t available_memory;
    uint64_t disk_caches;
    uint64_t hugetlb_allocations;
    uint64_t hugetlb_failures;
    uint64_t stats_updates;   /* how many statistics buffers the guest delivered */
} sm_balloon_stats;

enum {
    SM_BALLOON_STAT_SWAP_IN = 0,
    SM_BALLOON_STAT_SWAP_OUT = 1,
    SM_BALLOON_STAT_MAJOR_FAULTS = 2,
    SM_BALLOON_STAT_MINOR_FAULTS = 3,
    SM_BALLOON_STAT_FREE_MEMORY = 4,
    SM_BALLOON_STAT_TOTAL_MEMORY = 5,
    SM_BALLOON_STAT_AVAILABLE_MEMORY = 6,
    SM_BALLOON_STAT_DISK_CACHES = 7,
    SM_BALLOON_STAT_HUGETLB_ALLOCATIONS = 8,
    SM_BALLOON_STAT_HUGETLB_FAILURES = 9
};

/* Per-device state for panels and tests. counters are device specific; counter_names
 * names them ("" after the last). */
typedef struct sm_device_info {
    char name[32];            /* "virtio-blk0", "virtio-balloon", "virtio-vsock" */
    uint32_t virtio_device_id;
    uint64_t mmio_base;
    uint32_t irq;
    int32_t broken;           /* nonzero: device stopped processing; see broken_reason */
    char broken_reason[256];
    uint32_t driver_status;   /* virtio status byte last written by the driver */
    uint64_t counters[32];
    char counter_names[32][32];
} sm_device_info;

/* A vCPU's main registers, readable while the VM is paused, stopped or failed. */
typedef struct sm_vcpu_regs {
    uint64_t rip, rsp, rflags, rax, rbx, rcx, rdx, rsi, rdi;
    uint64_t cr0, cr2, cr3, cr4, efer;
    uint16_t cs_selector;
    uint8_t cs_long_mode;
} sm_vcpu_regs;

/* Library. */
const char *sm_version(void);
const char *sm_status_name(int status);
const char *sm_exit_reason_name(int reason);
/* Probe /dev/kvm: API version and every extension the core needs. SM_OK or an error
 * whose message (in err) names the missing piece. */
int sm_kvm_check(char *err, size_t err_len);

/* VM lifecycle. */
int sm_vm_create(const sm_vm_config *config, sm_vm **out, char *err, size_t err_len);
int sm_vm_start(sm_vm *vm);
int sm_vm_pause(sm_vm *vm);
int sm_vm_resume(sm_vm *vm);
int sm_vm_stop(sm_vm *vm);
/* Wait until the VM is STOPPED or FAILED; returns the state or SM_ERR_TIMEOUT. */
int sm_vm_wait(sm_vm *vm, int timeout_ms);
/* Joins every thread, closes every fd, unmaps guest memory, frees vm. NULL is fine. */
void sm_vm_destroy(sm_vm *vm);

int sm_vm_get_state(sm_vm *vm);
const char *sm_vm_state_name(int state);
/* Copies the message of the last failed call on vm into buf; returns its length. */
size_t sm_vm_last_error(sm_vm *vm, char *buf, size_t len);
int sm_vm_exit_info(sm_vm *vm, sm_exit_info *out);
/* Registers of vCPU `index`; SM_ERR_BAD_STATE while the VM runs (pause it first). */
int sm_vm_vcpu_regs(sm_vm *vm, uint32_t index, sm_vcpu_regs *out);
/* The command line the guest actually gets (user part + virtio-mmio declarations). */
size_t sm_vm_cmdline(sm_vm *vm, char *buf, size_t len);
/* Only the virtio-mmio declarations, e.g. "virtio_mmio.device=4K@0xd0000000:5". */
size_t sm_vm_virtio_cmdline_fragment(sm_vm *vm, char *buf, size_t len);

/* Snapshots (native format, see native/src/snapshot.h). sm_vm_snapshot pauses a running
 * VM, writes dir/memory.bin (guest RAM, zero pages left as holes) and dir/state.bin (vCPU,
 * irqchip, PIT, clock, UART state, and each virtio device's transport, queues and own state:
 * balloon target/actual/statistics, disk size/read-only/serial), then puts the VM back in the
 * state it was in. state.bin is flushed to disk; memory.bin is left in the page cache (a
 * flush would keep the guest paused for the disk): fsync it before relying on it after a
 * crash. Host-side vsock connections are not kept (see sm_vm_restore). A virtio-fs share
 * keeps its FUSE session (INIT state, node ids and open files as paths beneath the share:
 * devices/virtio_fs.h); a session above 1 MiB of paths refuses the snapshot with a message
 * naming the device, and nothing is written then. */
int sm_vm_snapshot(sm_vm *vm, const char *dir);
/* Build a VM from a snapshot directory. devices: the host side of the snapshot's devices
 * (balloon and its flags, blk paths/read_only/serial, vsock_uds_path and guest CID, fs
 * host_path/tag/read_only), the same kinds in the same order as the VM that made it; its
 * memory_mib, vcpus, kernel_path, initrd_path and cmdline are ignored. NULL: the snapshot
 * must have no virtio devices. A different device list is refused with a message that says
 * "snapshot" and what differs; so is a disk whose size, read-only flag or serial differs, a
 * balloon whose deflate_on_oom or statistics interval differs, a share whose tag or
 * read-only flag differs or whose saved session names a path that is not relative single
 * entries ("snapshot restore: <device>: ..."). A share's node ids and open files are
 * re-resolved beneath its host_path with the confinement of live lookups; one whose file is
 * not there answers the guest ESTALE (counter gone_at_restore).
 * Guest RAM is a MAP_PRIVATE (copy-on-write) mapping of dir/memory.bin, so many VMs restored
 * from one snapshot share its pages. A restored vsock device has no connections and sends
 * the guest a transport reset event (counter transport_resets). start_running: nonzero
 * starts the vCPUs; zero leaves the VM CREATED (sm_vm_start runs it). A damaged, truncated
 * or other-version snapshot fails with a message that says "snapshot" and why. */
int sm_vm_restore(const char *dir, const sm_vm_config *devices, int start_running, sm_vm **out,
                  char *err, size_t err_len);

/* Console (8250 UART at 0x3f8). Output is kept in a ring; *cursor is an absolute byte
 * offset the caller keeps (start at 0). Returns bytes copied; if the caller fell behind
 * the ring, *cursor jumps ahead and *lost (if not NULL) receives the bytes skipped. */
size_t sm_vm_console_read(sm_vm *vm, uint8_t *buf, size_t len, uint64_t *cursor,
                          uint64_t *lost);
/* Total bytes the guest has written so far. */
uint64_t sm_vm_console_total(sm_vm *vm);
/* Queue bytes as UART input. Returns bytes accepted (the RX FIFO is bounded). */
int sm_vm_console_write(sm_vm *vm, const uint8_t *buf, size_t len);

/* Balloon. */
int sm_vm_balloon_set_target_pages(sm_vm *vm, uint32_t target_pages);
int sm_vm_balloon_set_stats_interval(sm_vm *vm, uint32_t seconds);
int sm_vm_balloon_stats(sm_vm *vm, sm_balloon_stats *out);

/* Guest RAM pages resident in host memory, in bytes (mincore over guest RAM): the VM's
 * memory cost to the host, which balloon inflation lowers. */
uint64_t sm_vm_guest_resident_bytes(sm_vm *vm);

/* Devices. */
int sm_vm_device_count(sm_vm *vm);
int sm_vm_device_info(sm_vm *vm, uint32_t index, sm_device_info *out);

/* vCPU speed calibration: the calib probe runs this loop in the guest and prints the TSC
 * cycles it took; the host runs the same code here. Returns TSC cycles; *checksum gets the
 * loop result (the guest prints it too, so both sides provably ran the same work). */
uint64_t sm_calib_loop(uint64_t iterations, uint64_t *checksum);
/* Host monotonic clock in nanoseconds. */
uint64_t sm_monotonic_ns(void);

#endif /* SUPERMACHINE_H */

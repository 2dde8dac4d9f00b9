/* vm.c — the public C ABI: VM lifecycle, I/O dispatch, console, balloon, device info. */
#define _GNU_SOURCE
#include "sm_internal.h"
#include "doorbells.h"
#include "event_loop.h"
#include "devices/cmos_rtc.h"
#include "devices/device.h"
#include "devices/i8042.h"
#include "devices/uart8250.h"
#include "devices/virtio_balloon.h"
#include "devices/virtio_blk.h"
#include "devices/virtio_fs.h"
#include "devices/virtio_mmio.h"
#include "devices/virtio_vsock.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define SM_MIN_MEMORY_MIB 16
#define SM_MAX_MEMORY_MIB (1024u * 1024u)
#define SM_POST_CODE_PORT 0x80

typedef struct sm_port_range {
    uint16_t first, last;
    const char *name;
} sm_port_range;

/* Legacy PC ports a guest (Linux) probes and that we deliberately leave absent: reads
 * return all-ones, writes are dropped, nothing is flagged. */
static const sm_port_range SM_ABSENT_LEGACY_PORTS[] = {
    {0x80, 0x80, "POST code"},
    {0x87, 0x87, "DMA page"},
    {0xed, 0xed, "I/O delay"},
    {0x2e8, 0x2ef, "COM4"},
    {0x2f8, 0x2ff, "COM2"},
    {0x3e8, 0x3ef, "COM3"},
    {0xcf8, 0xcff, "PCI configuration"},
};

static const char *const SM_STATUS_NAMES[] = {
    "SM_OK", "SM_ERR_INVALID_ARGUMENT", "SM_ERR_KVM_UNAVAILABLE", "SM_ERR_KVM_API_VERSION",
    "SM_ERR_KVM_MISSING_EXTENSION", "SM_ERR_KVM_IOCTL", "SM_ERR_OUT_OF_MEMORY",
    "SM_ERR_KERNEL_LOAD", "SM_ERR_INITRD_LOAD", "SM_ERR_DEVICE_SETUP", "SM_ERR_THREAD",
    "SM_ERR_BAD_STATE", "SM_ERR_NO_SUCH_DEVICE", "SM_ERR_VM_FAILED", "SM_ERR_TIMEOUT",
};

static const char *const SM_EXIT_REASON_NAMES[] = {
    "none", "host_stop", "guest_reset", "triple_fault", "internal_error", "emulation_failure",
    "fail_entry", "unhandled_io", "unhandled_mmio", "unknown_kvm_exit", "kvm_run_error",
    "guest_halt",
};

static const char *const SM_STATE_NAMES[] = {"created", "running", "paused", "stopped", "failed"};

const char *sm_version(void) { return SM_VERSION_STRING; }

const char *sm_status_name(int status)
{
    int i = -status;
    if (i < 0 || i >= (int)(sizeof(SM_STATUS_NAMES) / sizeof(SM_STATUS_NAMES[0])))
        return "SM_ERR_UNKNOWN";
    return SM_STATUS_NAMES[i];
}

const char *sm_exit_reason_name(int reason)
{
    if (reason < 0 || reason >= (int)(sizeof(SM_EXIT_REASON_NAMES) / sizeof(SM_EXIT_REASON_NAMES[0])))
        return "unknown";
    return SM_EXIT_REASON_NAMES[reason];
}

const char *sm_vm_state_name(int state)
{
    if (state < 0 || state >= (int)(sizeof(SM_STATE_NAMES) / sizeof(SM_STATE_NAMES[0])))
        return "unknown";
    return SM_STATE_NAMES[state];
}

uint64_t sm_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- errors, ending, notes ---------------------------------------------------------- */

void sm_vm_set_error(struct sm_vm *vm, const char *fmt, ...)
{
    char msg[SM_ERROR_MESSAGE_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    pthread_mutex_lock(&vm->lock);
    memcpy(vm->last_error, msg, sizeof(msg));
    pthread_mutex_unlock(&vm->lock);
}

static int fail_call(struct sm_vm *vm, int status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail_call(struct sm_vm *vm, int status, const char *fmt, ...)
{
    char msg[SM_ERROR_MESSAGE_BYTES];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    sm_vm_set_error(vm, "%s", msg);
    return status;
}

void sm_vm_console_note(struct sm_vm *vm, const char *fmt, ...)
{
    if (!vm->uart)
        return;
    char msg[SM_ERROR_MESSAGE_BYTES + 32];
    int n = snprintf(msg, sizeof(msg), "\r\n[supermachine] ");
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(msg + n, sizeof(msg) - (size_t)n - 3, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(msg) - 3)
        n = (int)sizeof(msg) - 3;
    msg[n++] = '\r';
    msg[n++] = '\n';
    sm_uart_output_append(vm->uart, (const uint8_t *)msg, (size_t)n);
}

void sm_vm_end_detail(struct sm_vm *vm, const sm_exit_info *detail, int state)
{
    pthread_mutex_lock(&vm->lock);
    if (vm->state == SM_STATE_STOPPED || vm->state == SM_STATE_FAILED) {
        pthread_mutex_unlock(&vm->lock);
        return;
    }
    uint64_t io = vm->exit.unhandled_io_count, mmio = vm->exit.unhandled_mmio_count;
    char first[sizeof(vm->exit.first_unhandled)];
    memcpy(first, vm->exit.first_unhandled, sizeof(first));
    vm->exit = *detail;
    vm->exit.unhandled_io_count = io;
    vm->exit.unhandled_mmio_count = mmio;
    memcpy(vm->exit.first_unhandled, first, sizeof(first));
    vm->exit.state = state;
    /* The console note goes in before anyone can see the new state (lock order: vm, uart). */
    sm_vm_console_note(vm, "VM %s (%s): %s", state == SM_STATE_FAILED ? "failed" : "stopped",
                       sm_exit_reason_name(detail->reason), detail->message);
    vm->state = state;
    vm->stop_requested = 1;
    if (state == SM_STATE_FAILED)
        snprintf(vm->last_error, sizeof(vm->last_error), "%s", detail->message);
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    sm_vcpu_kick_all(vm);
}

void sm_vm_end(struct sm_vm *vm, int state, int reason, const char *fmt, ...)
{
    sm_exit_info d;
    memset(&d, 0, sizeof(d));
    d.reason = reason;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(d.message, sizeof(d.message), fmt, ap);
    va_end(ap);
    sm_vm_end_detail(vm, &d, state);
}

void sm_vm_flag_unhandled(struct sm_vm *vm, int is_mmio, const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    if (vm->strict_unhandled_exits) {
        char what[sizeof(msg) + 96];
        snprintf(what, sizeof(what), "%s (exit %s; strict mode ends the VM on unhandled exits)",
                 msg, is_mmio ? "KVM_EXIT_MMIO" : "KVM_EXIT_IO");
        sm_vcpu_fail_current(vm, is_mmio ? SM_EXIT_UNHANDLED_MMIO : SM_EXIT_UNHANDLED_IO, what);
        return;
    }
    pthread_mutex_lock(&vm->lock);
    int first = vm->exit.unhandled_io_count + vm->exit.unhandled_mmio_count == 0;
    if (is_mmio)
        vm->exit.unhandled_mmio_count++;
    else
        vm->exit.unhandled_io_count++;
    if (first)
        snprintf(vm->exit.first_unhandled, sizeof(vm->exit.first_unhandled), "%s", msg);
    pthread_mutex_unlock(&vm->lock);
}

/* ---- what devices are handed (devices/device.h) ------------------------------------ */

static int irq_set_level(struct sm_vm *vm, uint32_t gsi, int level)
{
    struct kvm_irq_level l = {.irq = gsi, .level = (uint32_t)level};
    return ioctl(vm->vm_fd, KVM_IRQ_LINE, &l);
}

static void irq_pulse(void *ctx, uint32_t gsi)
{
    struct sm_vm *vm = ctx;
    irq_set_level(vm, gsi, 1);
    irq_set_level(vm, gsi, 0);
}

static sm_irq_line device_irq_line(struct sm_vm *vm, uint32_t gsi)
{
    return (sm_irq_line){.pulse = irq_pulse, .ctx = vm, .gsi = gsi};
}

static void device_broken(void *ctx, const char *device, const char *reason)
{
    sm_vm_console_note(ctx, "device %s is broken: %s", device, reason);
}

static void device_reset(void *ctx, const char *why)
{
    sm_vm_end(ctx, SM_STATE_STOPPED, SM_EXIT_GUEST_RESET, "%s", why);
}

static sm_device_reporter device_reporter(struct sm_vm *vm)
{
    return (sm_device_reporter){.broken = device_broken, .reset = device_reset, .ctx = vm};
}

/* ---- I/O dispatch ------------------------------------------------------------------- */

void sm_io_port(struct sm_vm *vm, uint16_t port, uint8_t *data, uint32_t size, int is_write)
{
    if (port >= SM_COM1_PORT && port < SM_COM1_PORT + SM_UART_REGISTER_COUNT) {
        for (uint32_t i = 0; i < size && port + i < SM_COM1_PORT + SM_UART_REGISTER_COUNT; i++)
            sm_uart_pio(vm->uart, (uint16_t)(port + i - SM_COM1_PORT), data + i, is_write);
        return;
    }
    if (port == SM_I8042_DATA_PORT || port == SM_I8042_COMMAND_PORT) {
        sm_i8042_pio(&vm->i8042, port, data, is_write);
        if (!is_write && size > 1)            /* the bytes above belong to ports nobody owns */
            memset(data + 1, 0xff, size - 1);
        return;
    }
    if (port == SM_CMOS_INDEX_PORT || port == SM_CMOS_DATA_PORT) {
        if (!is_write)
            memset(data, 0xff, size);         /* bytes past 0x71 belong to nobody */
        for (uint32_t i = 0; i < size && port + i <= SM_CMOS_DATA_PORT; i++)
            sm_cmos_rtc_pio(&vm->rtc, (uint16_t)(port + i), data + i, is_write);
        return;
    }
    for (size_t i = 0; i < sizeof(SM_ABSENT_LEGACY_PORTS) / sizeof(SM_ABSENT_LEGACY_PORTS[0]); i++) {
        if (port >= SM_ABSENT_LEGACY_PORTS[i].first && port <= SM_ABSENT_LEGACY_PORTS[i].last) {
            if (!is_write)
                memset(data, 0xff, size);
            return;
        }
    }
    if (!is_write)
        memset(data, 0xff, size);
    uint64_t value = 0;
    if (is_write)
        memcpy(&value, data, size > 8 ? 8 : size);
    if (is_write)
        sm_vm_flag_unhandled(vm, 0, "unhandled I/O port write: port 0x%x, size %u, value 0x%llx",
                             port, size, (unsigned long long)value);
    else
        sm_vm_flag_unhandled(vm, 0, "unhandled I/O port read: port 0x%x, size %u", port, size);
}

void sm_io_mmio(struct sm_vm *vm, uint64_t gpa, uint8_t *data, uint32_t size, int is_write)
{
    if (gpa >= SM_VIRTIO_MMIO_BASE_GPA) {
        uint64_t slot = (gpa - SM_VIRTIO_MMIO_BASE_GPA) / SM_VIRTIO_MMIO_SLOT_BYTES;
        if (slot < vm->n_virtio) {
            uint64_t offset = gpa - vm->virtio[slot]->base_gpa;
            if (offset + size <= SM_VIRTIO_MMIO_SLOT_BYTES) {
                sm_virtio_mmio_access(vm->virtio[slot], offset, data, size, is_write);
                return;
            }
        }
    }
    if (!is_write)
        memset(data, 0xff, size);
    uint64_t value = 0;
    if (is_write)
        memcpy(&value, data, size > 8 ? 8 : size);
    if (is_write)
        sm_vm_flag_unhandled(vm, 1, "unhandled MMIO write: address 0x%llx, size %u, value 0x%llx",
                             (unsigned long long)gpa, size, (unsigned long long)value);
    else
        sm_vm_flag_unhandled(vm, 1, "unhandled MMIO read: address 0x%llx, size %u",
                             (unsigned long long)gpa, size);
}

/* ---- creation ----------------------------------------------------------------------- */

/* ISA interrupt lines the legacy devices raise or Linux's drivers for them claim (COM1, the
 * i8042's keyboard and mouse, the RTC): a virtio device never shares one. */
static const uint32_t SM_LEGACY_IRQS[] = {SM_COM1_IRQ, SM_I8042_KEYBOARD_IRQ,
                                          SM_I8042_MOUSE_IRQ, SM_CMOS_RTC_IRQ};

static int is_legacy_irq(uint32_t gsi)
{
    for (size_t i = 0; i < sizeof(SM_LEGACY_IRQS) / sizeof(SM_LEGACY_IRQS[0]); i++)
        if (SM_LEGACY_IRQS[i] == gsi)
            return 1;
    return 0;
}

/* The GSI of the virtio device in `slot`: upwards from SM_VIRTIO_FIRST_IRQ, legacy lines
 * skipped (slots 0-11 get 5-7, 9-11, 13-18, all IOAPIC pins). */
static uint32_t virtio_irq(uint32_t slot)
{
    uint32_t gsi = SM_VIRTIO_FIRST_IRQ;
    for (uint32_t seen = 0;; gsi++) {
        if (is_legacy_irq(gsi))
            continue;
        if (seen++ == slot)
            return gsi;
    }
}

static int add_virtio(struct sm_vm *vm, const char *name, const sm_virtio_ops *ops, void *dev,
                      sm_virtio_mmio **out, char *err, size_t err_len)
{
    if (vm->n_virtio >= SM_MAX_VIRTIO_DEVICES) {
        snprintf(err, err_len, "too many virtio devices (max %d)", SM_MAX_VIRTIO_DEVICES);
        ops->destroy(dev);
        return SM_ERR_DEVICE_SETUP;
    }
    uint32_t slot = vm->n_virtio;
    uint64_t base = SM_VIRTIO_MMIO_BASE_GPA + slot * SM_VIRTIO_MMIO_SLOT_BYTES;
    uint32_t irq = virtio_irq(slot);
    sm_virtio_mmio *t = sm_virtio_mmio_create(name, base, ops, dev, &vm->mem,
                                              device_irq_line(vm, irq), device_reporter(vm));
    if (!t) {
        ops->destroy(dev);
        snprintf(err, err_len, "out of memory for %s", name);
        return SM_ERR_OUT_OF_MEMORY;
    }
    vm->virtio[vm->n_virtio++] = t;
    if (!vm->queue_notify_exits && sm_doorbells_available(vm)) {
        vm->doorbells[slot] = sm_doorbells_attach(vm, t, err, err_len);
        if (!vm->doorbells[slot])
            return SM_ERR_DEVICE_SETUP;
    }
    size_t used = strlen(vm->virtio_fragment);
    snprintf(vm->virtio_fragment + used, sizeof(vm->virtio_fragment) - used,
             "%svirtio_mmio.device=4K@0x%llx:%u", used ? " " : "", (unsigned long long)base, irq);
    if (out)
        *out = t;
    return SM_OK;
}

static int create_devices(struct sm_vm *vm, const sm_vm_config *c, char *err, size_t err_len)
{
    vm->uart = sm_uart_create(SM_COM1_PORT, device_irq_line(vm, SM_COM1_IRQ));
    if (!vm->uart) {
        snprintf(err, err_len, "out of memory for the UART");
        return SM_ERR_OUT_OF_MEMORY;
    }
    sm_i8042_init(&vm->i8042, device_irq_line(vm, SM_I8042_KEYBOARD_IRQ),
                  device_irq_line(vm, SM_I8042_MOUSE_IRQ), device_reporter(vm));
    sm_cmos_rtc_init(&vm->rtc);
    vm->legacy_devices_ready = 1;
    vm->loop = sm_event_loop_create(err, err_len);
    if (!vm->loop)
        return SM_ERR_DEVICE_SETUP;
    int rc;
    if (c->balloon) {
        sm_balloon *b = sm_balloon_create(c->balloon_deflate_on_oom, c->balloon_stats_interval_s);
        if (!b) {
            snprintf(err, err_len, "out of memory for the balloon");
            return SM_ERR_OUT_OF_MEMORY;
        }
        sm_virtio_mmio *t;
        rc = add_virtio(vm, "virtio-balloon", &SM_BALLOON_OPS, b, &t, err, err_len);
        if (rc != SM_OK)
            return rc;
        if (sm_balloon_attach(b, t, vm->loop) < 0) {
            snprintf(err, err_len, "virtio-balloon: statistics timer setup failed: %s", strerror(errno));
            return SM_ERR_DEVICE_SETUP;
        }
        vm->balloon = b;
    }
    for (uint32_t i = 0; i < c->n_blk; i++) {
        sm_blk *b = sm_blk_create(c->blk[i].path, c->blk[i].read_only, c->blk[i].serial, i, err, err_len);
        if (!b)
            return SM_ERR_DEVICE_SETUP;
        char name[32];
        snprintf(name, sizeof(name), "virtio-blk%u", i);
        sm_virtio_mmio *t;
        rc = add_virtio(vm, name, &SM_BLK_OPS, b, &t, err, err_len);
        if (rc != SM_OK)
            return rc;
        b->transport = t;
    }
    if (c->vsock_uds_path && *c->vsock_uds_path) {
        sm_vsock *v = sm_vsock_create(c->vsock_uds_path, c->vsock_guest_cid, err, err_len);
        if (!v)
            return SM_ERR_DEVICE_SETUP;
        sm_virtio_mmio *t;
        rc = add_virtio(vm, "virtio-vsock", &SM_VSOCK_OPS, v, &t, err, err_len);
        if (rc != SM_OK)
            return rc;
        if (sm_vsock_attach(v, t, vm->loop, err, err_len) < 0)
            return SM_ERR_DEVICE_SETUP;
        vm->vsock = v;
    }
    for (uint32_t i = 0; i < c->n_fs; i++) {
        sm_fs *f = sm_fs_create(c->fs[i].host_path, c->fs[i].tag, c->fs[i].read_only, i, err, err_len);
        if (!f)
            return SM_ERR_DEVICE_SETUP;
        char name[32];
        snprintf(name, sizeof(name), "virtio-fs%u", i);
        sm_virtio_mmio *t;
        rc = add_virtio(vm, name, &SM_FS_OPS, f, &t, err, err_len);
        if (rc != SM_OK)
            return rc;
        f->transport = t;
    }
    return SM_OK;
}

static int validate_config(const sm_vm_config *c, char *err, size_t err_len)
{
    if (c->memory_mib < SM_MIN_MEMORY_MIB || c->memory_mib > SM_MAX_MEMORY_MIB) {
        snprintf(err, err_len, "memory_mib %u outside [%u, %u]", c->memory_mib, SM_MIN_MEMORY_MIB,
                 SM_MAX_MEMORY_MIB);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (c->vcpus < 1 || c->vcpus > SM_MAX_VCPUS) {
        snprintf(err, err_len, "vcpus %u outside [1, %d]", c->vcpus, SM_MAX_VCPUS);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (!c->kernel_path || !*c->kernel_path) {
        snprintf(err, err_len, "kernel_path is required");
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (c->n_blk > SM_MAX_BLK_DEVICES) {
        snprintf(err, err_len, "n_blk %u above %d", c->n_blk, SM_MAX_BLK_DEVICES);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (c->n_fs > SM_MAX_FS_DEVICES) {
        snprintf(err, err_len, "n_fs %u above %d", c->n_fs, SM_MAX_FS_DEVICES);
        return SM_ERR_INVALID_ARGUMENT;
    }
    if (c->vsock_uds_path && *c->vsock_uds_path && c->vsock_guest_cid < 3) {
        snprintf(err, err_len, "vsock_guest_cid %u: guest CIDs start at 3", c->vsock_guest_cid);
        return SM_ERR_INVALID_ARGUMENT;
    }
    return SM_OK;
}

int sm_vm_create(const sm_vm_config *c, sm_vm **out, char *err, size_t err_len)
{
    return sm_vm_create_internal(c, -1, out, err, err_len);
}

/* memory_fd >= 0: guest RAM is a copy-on-write mapping of that file (a snapshot's
 * memory.bin) and no kernel is loaded; the caller sets the vCPU and irqchip state. */
int sm_vm_create_internal(const sm_vm_config *c, int memory_fd, sm_vm **out, char *err,
                          size_t err_len)
{
    char dummy[8];
    if (!err || !err_len) {
        err = dummy;
        err_len = sizeof(dummy);
    }
    err[0] = 0;
    if (!c || !out) {
        snprintf(err, err_len, "config and out must not be NULL");
        return SM_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    int rc = validate_config(c, err, err_len);
    if (rc != SM_OK)
        return rc;
    struct sm_vm *vm = calloc(1, sizeof(*vm));
    if (!vm) {
        snprintf(err, err_len, "out of memory");
        return SM_ERR_OUT_OF_MEMORY;
    }
    vm->kvm_fd = vm->vm_fd = -1;
    for (uint32_t i = 0; i < SM_MAX_VCPUS; i++)
        vm->vcpus[i].fd = -1;
    pthread_mutex_init(&vm->lock, NULL);
    pthread_cond_init(&vm->cond, NULL);
    vm->state = SM_STATE_CREATED;
    vm->n_vcpus = c->vcpus;
    vm->strict_unhandled_exits = c->strict_unhandled_exits;
    vm->queue_notify_exits = c->queue_notify_exits;

    rc = sm_kvm_open(vm, err, err_len);
    if (rc == SM_OK && memory_fd < 0 &&
        sm_memory_init(&vm->mem, (uint64_t)c->memory_mib * SM_MIB_BYTES,
                       SM_MMIO_HOLE_START_GPA, SM_MMIO_HOLE_END_GPA, err, err_len) < 0)
        rc = SM_ERR_OUT_OF_MEMORY;
    if (rc == SM_OK && memory_fd >= 0 &&
        sm_memory_init_file(&vm->mem, memory_fd, (uint64_t)c->memory_mib * SM_MIB_BYTES,
                            SM_MMIO_HOLE_START_GPA, SM_MMIO_HOLE_END_GPA, err, err_len) < 0)
        rc = SM_ERR_OUT_OF_MEMORY;
    if (rc == SM_OK)
        rc = sm_kvm_setup_vm(vm, err, err_len);
    if (rc == SM_OK)
        rc = create_devices(vm, c, err, err_len);
    if (rc == SM_OK) {
        const char *user = c->cmdline ? c->cmdline : "";
        int n = snprintf(vm->cmdline, sizeof(vm->cmdline), "%s%s%s", user,
                         (*user && vm->virtio_fragment[0]) ? " " : "", vm->virtio_fragment);
        if (n < 0 || (size_t)n >= sizeof(vm->cmdline)) {
            snprintf(err, err_len, "command line longer than %d bytes", SM_CMDLINE_MAX_BYTES - 1);
            rc = SM_ERR_INVALID_ARGUMENT;
        }
    }
    if (rc == SM_OK && memory_fd < 0)
        rc = sm_boot_load(vm, c->kernel_path, c->initrd_path, vm->cmdline, err, err_len);
    if (rc == SM_OK)
        rc = sm_kvm_create_vcpus(vm, err, err_len);
    if (rc != SM_OK) {
        sm_vm_destroy(vm);
        return rc;
    }
    *out = vm;
    return SM_OK;
}

/* ---- lifecycle ---------------------------------------------------------------------- */

int sm_vm_start(sm_vm *vm)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    int state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    if (state != SM_STATE_CREATED)
        return fail_call(vm, SM_ERR_BAD_STATE, "start: VM is %s, not created", sm_vm_state_name(state));
    char err[SM_ERROR_MESSAGE_BYTES];
    if (sm_event_loop_start(vm->loop, err, sizeof(err)) < 0)
        return fail_call(vm, SM_ERR_THREAD, "%s", err);
    pthread_mutex_lock(&vm->lock);
    vm->state = SM_STATE_RUNNING;
    pthread_mutex_unlock(&vm->lock);
    int rc = sm_vcpu_start_threads(vm, err, sizeof(err));
    if (rc != SM_OK) {
        sm_vm_end(vm, SM_STATE_FAILED, SM_EXIT_NONE, "%s", err);
        sm_vcpu_join_all(vm);
        return fail_call(vm, rc, "%s", err);
    }
    return SM_OK;
}

int sm_vm_pause(sm_vm *vm)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    if (vm->state != SM_STATE_RUNNING) {
        int state = vm->state;
        pthread_mutex_unlock(&vm->lock);
        if (state == SM_STATE_PAUSED)
            return SM_OK;
        return fail_call(vm, SM_ERR_BAD_STATE, "pause: VM is %s", sm_vm_state_name(state));
    }
    __atomic_store_n(&vm->pause_requested, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&vm->lock);
    sm_vcpu_kick_all(vm);
    pthread_mutex_lock(&vm->lock);
    while (vm->vcpus_paused < vm->vcpus_running && !vm->stop_requested) {
        pthread_mutex_unlock(&vm->lock);
        sm_vcpu_kick_all(vm); /* a vCPU blocked in the kernel (HLT, wait-for-SIPI) */
        usleep(1000);
        pthread_mutex_lock(&vm->lock);
    }
    if (vm->state == SM_STATE_RUNNING)
        vm->state = SM_STATE_PAUSED;
    int state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    return state == SM_STATE_PAUSED ? SM_OK
                                    : fail_call(vm, SM_ERR_VM_FAILED, "pause: VM ended while pausing");
}

int sm_vm_resume(sm_vm *vm)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    if (vm->state != SM_STATE_PAUSED) {
        int state = vm->state;
        pthread_mutex_unlock(&vm->lock);
        if (state == SM_STATE_RUNNING)
            return SM_OK;
        return fail_call(vm, SM_ERR_BAD_STATE, "resume: VM is %s", sm_vm_state_name(state));
    }
    __atomic_store_n(&vm->pause_requested, 0, __ATOMIC_RELEASE);
    vm->state = SM_STATE_RUNNING;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return SM_OK;
}

int sm_vm_stop(sm_vm *vm)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    int state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    if (state == SM_STATE_CREATED || state == SM_STATE_RUNNING || state == SM_STATE_PAUSED)
        sm_vm_end(vm, SM_STATE_STOPPED, SM_EXIT_HOST_STOP, "stopped by the host");
    sm_vcpu_join_all(vm);
    return SM_OK;
}

int sm_vm_wait(sm_vm *vm, int timeout_ms)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    struct timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (deadline.tv_nsec >= 1000000000L) {
        deadline.tv_sec++;
        deadline.tv_nsec -= 1000000000L;
    }
    pthread_mutex_lock(&vm->lock);
    while (vm->state != SM_STATE_STOPPED && vm->state != SM_STATE_FAILED) {
        if (timeout_ms < 0) {
            pthread_cond_wait(&vm->cond, &vm->lock);
        } else if (pthread_cond_timedwait(&vm->cond, &vm->lock, &deadline) == ETIMEDOUT) {
            break;
        }
    }
    int state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    if (state != SM_STATE_STOPPED && state != SM_STATE_FAILED)
        return SM_ERR_TIMEOUT;
    return state;
}

void sm_vm_destroy(sm_vm *vm)
{
    if (!vm)
        return;
    pthread_mutex_lock(&vm->lock);
    int state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    if (state == SM_STATE_RUNNING || state == SM_STATE_PAUSED)
        sm_vm_end(vm, SM_STATE_STOPPED, SM_EXIT_HOST_STOP, "destroyed by the host");
    sm_vcpu_join_all(vm);
    if (vm->loop)
        sm_event_loop_stop(vm->loop);
    for (uint32_t i = 0; i < vm->n_virtio; i++) {
        sm_virtio_mmio_destroy(vm->virtio[i]);
        sm_doorbells_destroy(vm->doorbells[i]);   /* their fds leave the stopped loop */
    }
    vm->n_virtio = 0;
    if (vm->loop)
        sm_event_loop_destroy(vm->loop);
    for (uint32_t i = 0; i < SM_MAX_VCPUS; i++) {
        if (vm->vcpus[i].run)
            munmap(vm->vcpus[i].run, vm->run_mmap_bytes);
        if (vm->vcpus[i].fd >= 0)
            close(vm->vcpus[i].fd);
    }
    if (vm->vm_fd >= 0)
        close(vm->vm_fd);
    if (vm->kvm_fd >= 0)
        close(vm->kvm_fd);
    sm_memory_destroy(&vm->mem);
    sm_uart_destroy(vm->uart);
    if (vm->legacy_devices_ready) {
        sm_i8042_destroy(&vm->i8042);
        sm_cmos_rtc_destroy(&vm->rtc);
    }
    free(vm->cpuid);
    pthread_mutex_destroy(&vm->lock);
    pthread_cond_destroy(&vm->cond);
    free(vm);
}

/* ---- queries ------------------------------------------------------------------------ */

int sm_vm_get_state(sm_vm *vm)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    int s = vm->state;
    pthread_mutex_unlock(&vm->lock);
    return s;
}

size_t sm_vm_last_error(sm_vm *vm, char *buf, size_t len)
{
    if (!vm || !buf || !len)
        return 0;
    pthread_mutex_lock(&vm->lock);
    snprintf(buf, len, "%s", vm->last_error);
    pthread_mutex_unlock(&vm->lock);
    return strlen(buf);
}

int sm_vm_exit_info(sm_vm *vm, sm_exit_info *out)
{
    if (!vm || !out)
        return SM_ERR_INVALID_ARGUMENT;
    pthread_mutex_lock(&vm->lock);
    *out = vm->exit;
    out->state = vm->state;
    pthread_mutex_unlock(&vm->lock);
    return SM_OK;
}

int sm_vm_vcpu_regs(sm_vm *vm, uint32_t index, sm_vcpu_regs *out)
{
    if (!vm || !out)
        return SM_ERR_INVALID_ARGUMENT;
    if (index >= vm->n_vcpus)
        return fail_call(vm, SM_ERR_INVALID_ARGUMENT, "no vCPU %u", index);
    int state = sm_vm_get_state(vm);
    if (state == SM_STATE_RUNNING)
        return fail_call(vm, SM_ERR_BAD_STATE, "vCPU registers: pause the VM first");
    struct kvm_regs r;
    struct kvm_sregs sr;
    int fd = vm->vcpus[index].fd;
    if (ioctl(fd, KVM_GET_REGS, &r) < 0 || ioctl(fd, KVM_GET_SREGS, &sr) < 0)
        return fail_call(vm, SM_ERR_KVM_IOCTL, "KVM_GET_REGS/SREGS failed: %s", strerror(errno));
    memset(out, 0, sizeof(*out));
    out->rip = r.rip;
    out->rsp = r.rsp;
    out->rflags = r.rflags;
    out->rax = r.rax;
    out->rbx = r.rbx;
    out->rcx = r.rcx;
    out->rdx = r.rdx;
    out->rsi = r.rsi;
    out->rdi = r.rdi;
    out->cr0 = sr.cr0;
    out->cr2 = sr.cr2;
    out->cr3 = sr.cr3;
    out->cr4 = sr.cr4;
    out->efer = sr.efer;
    out->cs_selector = sr.cs.selector;
    out->cs_long_mode = sr.cs.l;
    return SM_OK;
}

size_t sm_vm_cmdline(sm_vm *vm, char *buf, size_t len)
{
    if (!vm || !buf || !len)
        return 0;
    snprintf(buf, len, "%s", vm->cmdline);
    return strlen(buf);
}

size_t sm_vm_virtio_cmdline_fragment(sm_vm *vm, char *buf, size_t len)
{
    if (!vm || !buf || !len)
        return 0;
    snprintf(buf, len, "%s", vm->virtio_fragment);
    return strlen(buf);
}

size_t sm_vm_console_read(sm_vm *vm, uint8_t *buf, size_t len, uint64_t *cursor, uint64_t *lost)
{
    if (!vm || !buf || !cursor)
        return 0;
    return sm_uart_output_read(vm->uart, buf, len, cursor, lost);
}

uint64_t sm_vm_console_total(sm_vm *vm)
{
    return vm ? sm_uart_output_total(vm->uart) : 0;
}

int sm_vm_console_write(sm_vm *vm, const uint8_t *buf, size_t len)
{
    if (!vm || (!buf && len))
        return SM_ERR_INVALID_ARGUMENT;
    return sm_uart_input(vm->uart, buf, len);
}

int sm_vm_balloon_set_target_pages(sm_vm *vm, uint32_t target_pages)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    if (!vm->balloon)
        return fail_call(vm, SM_ERR_NO_SUCH_DEVICE, "this VM has no balloon device");
    if ((uint64_t)target_pages * SM_PAGE_SIZE_BYTES > vm->mem.total_bytes)
        return fail_call(vm, SM_ERR_INVALID_ARGUMENT, "balloon target %u pages exceeds guest RAM",
                         target_pages);
    sm_balloon_set_target(vm->balloon, target_pages);
    return SM_OK;
}

int sm_vm_balloon_set_stats_interval(sm_vm *vm, uint32_t seconds)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    if (!vm->balloon)
        return fail_call(vm, SM_ERR_NO_SUCH_DEVICE, "this VM has no balloon device");
    if (sm_balloon_set_stats_interval(vm->balloon, seconds) < 0)
        return fail_call(vm, SM_ERR_DEVICE_SETUP, "timerfd_settime failed: %s", strerror(errno));
    return SM_OK;
}

int sm_vm_balloon_stats(sm_vm *vm, sm_balloon_stats *out)
{
    if (!vm || !out)
        return SM_ERR_INVALID_ARGUMENT;
    if (!vm->balloon)
        return fail_call(vm, SM_ERR_NO_SUCH_DEVICE, "this VM has no balloon device");
    sm_balloon_get_stats(vm->balloon, out);
    return SM_OK;
}

uint64_t sm_vm_guest_resident_bytes(sm_vm *vm)
{
    return vm ? sm_memory_resident_bytes(&vm->mem) : 0;
}

int sm_vm_device_count(sm_vm *vm)
{
    return vm ? (int)vm->n_virtio : SM_ERR_INVALID_ARGUMENT;
}

int sm_vm_device_info(sm_vm *vm, uint32_t index, sm_device_info *out)
{
    if (!vm || !out)
        return SM_ERR_INVALID_ARGUMENT;
    if (index >= vm->n_virtio)
        return fail_call(vm, SM_ERR_NO_SUCH_DEVICE, "no device %u (the VM has %u)", index, vm->n_virtio);
    sm_virtio_mmio_info(vm->virtio[index], out);
    return SM_OK;
}

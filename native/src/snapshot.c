/* snapshot.c — sm_vm_snapshot / sm_vm_restore: the native core's own snapshot format
 * (snapshot.h). Guest RAM goes to a sparse memory.bin that restores map copy-on-write, so
 * many VMs restored from one snapshot share the file's pages until they write them. */
#define _GNU_SOURCE
#include "sm_internal.h"
#include "snapshot.h"
#include "devices/uart8250.h"
#include "devices/virtio_mmio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <unistd.h>

#define SM_SNAPSHOT_PATH_BYTES 4096
#define SM_FNV_OFFSET_BASIS 0xcbf29ce484222325ULL
#define SM_FNV_PRIME 0x100000001b3ULL

/* One line each: what is wrong with the snapshot (indexed by sm_snapshot_error). */
static const char *const SM_SNAPSHOT_ERROR_MESSAGES[SM_SNAPSHOT_ERROR_COUNT] = {
    "ok",
    "snapshot file cannot be opened",
    "snapshot is truncated",
    "not a supermachine native snapshot (bad magic)",
    "snapshot has an unsupported format version",
    "snapshot layout is invalid (sizes or counts out of range)",
    "snapshot is corrupted (checksum mismatch)",
    "snapshot memory.bin size does not match its header",
    "snapshot device list differs from the restore's devices",
};

/* MSRs carried across a snapshot; ones the host KVM refuses to read are left out. Restored
 * in this order by one KVM_SET_MSRS: the TSC before what is relative to it (the deadline,
 * kvmclock), the async-PF vector before async PF is enabled. */
static const uint32_t SM_SNAPSHOT_MSR_INDEXES[] = {
    0x00000010, /* IA32_TSC */
    0x0000003b, /* IA32_TSC_ADJUST */
    0x000006e0, /* IA32_TSC_DEADLINE: the LAPIC timer's deadline mode (not in KVM_GET_LAPIC) */
    0x00000048, /* IA32_SPEC_CTRL */
    0xc0000080, /* EFER */
    0xc0000081, /* STAR */
    0xc0000082, /* LSTAR */
    0xc0000083, /* CSTAR */
    0xc0000084, /* SYSCALL_MASK (FMASK) */
    0xc0000102, /* KERNEL_GS_BASE */
    0xc0000103, /* TSC_AUX */
    0x00000174, /* SYSENTER_CS */
    0x00000175, /* SYSENTER_ESP */
    0x00000176, /* SYSENTER_EIP */
    0x00000277, /* PAT */
    0x000001a0, /* MISC_ENABLE */
    /* KVM's paravirtual MSRs: without them the restored KVM neither updates the guest's
     * kvmclock page nor knows of its PV EOI, steal-time and async-PF areas. */
    0x4b564d00, /* KVM_WALL_CLOCK_NEW */
    0x4b564d01, /* KVM_SYSTEM_TIME_NEW */
    0x4b564d03, /* KVM_STEAL_TIME */
    0x4b564d04, /* KVM_PV_EOI_EN */
    0x4b564d05, /* KVM_POLL_CONTROL */
    0x4b564d06, /* KVM_ASYNC_PF_INT */
    0x4b564d02, /* KVM_ASYNC_PF_EN */
};

static uint64_t fnv1a(uint64_t h, const void *data, size_t len)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= SM_FNV_PRIME;
    }
    return h;
}

static int path_join(char *out, const char *dir, const char *file)
{
    int n = snprintf(out, SM_SNAPSHOT_PATH_BYTES, "%s/%s", dir, file);
    return n > 0 && n < SM_SNAPSHOT_PATH_BYTES ? 0 : -1;
}

static int write_all(int fd, const void *buf, size_t len, off_t off)
{
    const uint8_t *p = buf;
    while (len) {
        ssize_t n = pwrite(fd, p, len, off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
        off += n;
    }
    return 0;
}

static int page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)(const void *)p;
    for (size_t i = 0; i < SM_PAGE_SIZE_BYTES / 8; i++)
        if (w[i])
            return 0;
    return 1;
}

/* FNV-1a 64 over the header (its checksum field as zero) and the payload that follows it. */
static uint64_t snapshot_checksum(const uint8_t *file)
{
    sm_snapshot_header h;
    memcpy(&h, file, sizeof(h));
    h.checksum = 0;
    return fnv1a(fnv1a(SM_FNV_OFFSET_BASIS, &h, sizeof(h)), file + sizeof(h), h.payload_bytes);
}

/* ---- snapshot ----------------------------------------------------------------------- */

static int write_memory(struct sm_vm *vm, const char *path, char *err, size_t err_len)
{
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, err_len, "snapshot: cannot create %.300s: %s", path, strerror(errno));
        return -1;
    }
    uint64_t file_off = 0;
    for (uint32_t r = 0; r < vm->mem.n_regions; r++) {
        const sm_memory_region *reg = &vm->mem.regions[r];
        uint64_t pages = reg->size_bytes / SM_PAGE_SIZE_BYTES;
        /* Pages the guest never wrote need not even be read: reading them would fault each
         * one in, which costs more of the pause than copying the written ones. */
        uint8_t *written = malloc(pages);
        if (written && sm_memory_written_pages(&vm->mem, r, written) < 0) {
            free(written);
            written = NULL;   /* tell zero pages by reading them */
        }
        uint64_t run_start = 0, run_len = 0; /* a run of non-zero pages, written at once */
        for (uint64_t pg = 0; pg <= pages; pg++) {
            int zero = pg == pages || (written && !written[pg]) ||
                       page_is_zero(reg->host + pg * SM_PAGE_SIZE_BYTES);
            if (!zero) {
                if (!run_len)
                    run_start = pg;
                run_len++;
                continue;
            }
            if (run_len) {
                if (write_all(fd, reg->host + run_start * SM_PAGE_SIZE_BYTES,
                              run_len * SM_PAGE_SIZE_BYTES,
                              (off_t)(file_off + run_start * SM_PAGE_SIZE_BYTES)) < 0) {
                    snprintf(err, err_len, "snapshot: writing %.300s failed: %s", path, strerror(errno));
                    free(written);
                    close(fd);
                    return -1;
                }
                run_len = 0;
            }
        }
        free(written);
        file_off += reg->size_bytes;
    }
    /* The zero pages stay holes: the file is as long as guest RAM but sparse. Not flushed
     * here: that would keep the guest paused for the disk (the caller flushes it). */
    if (ftruncate(fd, (off_t)file_off) < 0) {
        snprintf(err, err_len, "snapshot: finishing %.300s failed: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    close(fd);
    return 0;
}

/* A paused vCPU may sit right after an I/O exit whose completion KVM does on the next
 * KVM_RUN; an immediate-exit run completes it so the saved registers are consistent. */
static void complete_pending_io(sm_vcpu *v)
{
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    (void)ioctl(v->fd, KVM_RUN, 0);
    __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
}

static int save_vcpu(struct sm_vm *vm, sm_vcpu *v, sm_snapshot_vcpu_state *s, uint32_t *flags,
                     char *err, size_t err_len)
{
    const char *what = NULL;
    if (ioctl(v->fd, KVM_GET_REGS, &s->regs) < 0)
        what = "KVM_GET_REGS";
    else if (ioctl(v->fd, KVM_GET_SREGS, &s->sregs) < 0)
        what = "KVM_GET_SREGS";
    else if (ioctl(v->fd, KVM_GET_FPU, &s->fpu) < 0)
        what = "KVM_GET_FPU";
    else if (ioctl(v->fd, KVM_GET_LAPIC, &s->lapic) < 0)
        what = "KVM_GET_LAPIC";
    else if (ioctl(v->fd, KVM_GET_MP_STATE, &s->mp_state) < 0)
        what = "KVM_GET_MP_STATE";
    else if (ioctl(v->fd, KVM_GET_VCPU_EVENTS, &s->events) < 0)
        what = "KVM_GET_VCPU_EVENTS";
    if (what) {
        snprintf(err, err_len, "snapshot: %s on vCPU %u failed: %s", what, v->index, strerror(errno));
        return -1;
    }
    if ((*flags & SM_SNAPSHOT_FLAG_XSAVE) &&
        (ioctl(v->fd, KVM_GET_XSAVE, &s->xsave) < 0 || ioctl(v->fd, KVM_GET_XCRS, &s->xcrs) < 0))
        *flags &= ~SM_SNAPSHOT_FLAG_XSAVE; /* fall back to the FPU state for every vCPU */
    s->n_msrs = 0;
    for (size_t i = 0; i < sizeof(SM_SNAPSHOT_MSR_INDEXES) / sizeof(SM_SNAPSHOT_MSR_INDEXES[0]); i++) {
        struct {
            struct kvm_msrs hdr;
            struct kvm_msr_entry entry;
        } one;
        memset(&one, 0, sizeof(one));
        one.hdr.nmsrs = 1;
        one.entry.index = SM_SNAPSHOT_MSR_INDEXES[i];
        if (ioctl(v->fd, KVM_GET_MSRS, &one) == 1 && s->n_msrs < SM_SNAPSHOT_MAX_MSRS)
            s->msrs[s->n_msrs++] = one.entry;
    }
    (void)vm;
    return 0;
}

static void save_uart(sm_uart *u, sm_snapshot_uart_state *s)
{
    pthread_mutex_lock(&u->lock);
    s->ier = u->ier;
    s->lcr = u->lcr;
    s->mcr = u->mcr;
    s->lsr_extra = u->lsr_extra;
    s->msr = u->msr;
    s->scr = u->scr;
    s->dll = u->dll;
    s->dlm = u->dlm;
    s->fcr = u->fcr;
    s->thr_interrupt_pending = u->thr_interrupt_pending;
    s->rx_len = u->rx_len;
    for (uint32_t i = 0; i < u->rx_len; i++)
        s->rx[i] = u->rx[(u->rx_head + i) % SM_UART_RX_FIFO_BYTES];
    pthread_mutex_unlock(&u->lock);
}

static int save_state(struct sm_vm *vm, const char *dir, char *err, size_t err_len)
{
    /* Devices first: their extra state decides how long the payload is. */
    sm_virtio_mmio_state *records = calloc(vm->n_virtio ? vm->n_virtio : 1, sizeof(*records));
    uint8_t *extras[SM_MAX_VIRTIO_DEVICES] = {0};
    uint8_t *buf = NULL;
    size_t extra_bytes = 0;
    int rc = -1;
    if (!records) {
        snprintf(err, err_len, "snapshot: out of memory");
        return -1;
    }
    char device_err[SM_ERROR_MESSAGE_BYTES];
    for (uint32_t i = 0; i < vm->n_virtio; i++) {
        if (sm_virtio_mmio_save(vm->virtio[i], &records[i], &extras[i], device_err, sizeof(device_err)) < 0) {
            snprintf(err, err_len, "snapshot: %.400s", device_err);
            goto out;
        }
        extra_bytes += records[i].extra_len;
    }
    size_t payload_bytes = sizeof(sm_snapshot_vm_state) + vm->n_vcpus * sizeof(sm_snapshot_vcpu_state) +
                           vm->n_virtio * sizeof(sm_virtio_mmio_state) + extra_bytes;
    buf = calloc(1, sizeof(sm_snapshot_header) + payload_bytes);
    if (!buf) {
        snprintf(err, err_len, "snapshot: out of memory");
        goto out;
    }
    sm_snapshot_header *h = (sm_snapshot_header *)(void *)buf;
    sm_snapshot_vm_state *vs = (sm_snapshot_vm_state *)(void *)(buf + sizeof(*h));
    sm_snapshot_vcpu_state *cs = (sm_snapshot_vcpu_state *)(void *)(vs + 1);
    sm_virtio_mmio_state *ds = (sm_virtio_mmio_state *)(void *)(cs + vm->n_vcpus);
    uint8_t *extra_at = (uint8_t *)(ds + vm->n_virtio);
    for (uint32_t i = 0; i < vm->n_virtio; i++) {
        ds[i] = records[i];
        if (records[i].extra_len)
            memcpy(extra_at, extras[i], records[i].extra_len);
        extra_at += records[i].extra_len;
    }
    vs->pic_master.chip_id = KVM_IRQCHIP_PIC_MASTER;
    vs->pic_slave.chip_id = KVM_IRQCHIP_PIC_SLAVE;
    vs->ioapic.chip_id = KVM_IRQCHIP_IOAPIC;
    const char *what = NULL;
    if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &vs->pic_master) < 0)
        what = "KVM_GET_IRQCHIP (PIC master)";
    else if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &vs->pic_slave) < 0)
        what = "KVM_GET_IRQCHIP (PIC slave)";
    else if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &vs->ioapic) < 0)
        what = "KVM_GET_IRQCHIP (IOAPIC)";
    else if (ioctl(vm->vm_fd, KVM_GET_PIT2, &vs->pit) < 0)
        what = "KVM_GET_PIT2";
    else if (ioctl(vm->vm_fd, KVM_GET_CLOCK, &vs->clock) < 0)
        what = "KVM_GET_CLOCK";
    if (what) {
        snprintf(err, err_len, "snapshot: %s failed: %s", what, strerror(errno));
        goto out;
    }
    save_uart(vm->uart, &vs->uart);
    uint32_t flags = ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XSAVE) > 0 &&
                     ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XCRS) > 0
                         ? SM_SNAPSHOT_FLAG_XSAVE : 0;
    for (uint32_t i = 0; i < vm->n_vcpus; i++)
        if (save_vcpu(vm, &vm->vcpus[i], &cs[i], &flags, err, err_len) < 0)
            goto out;
    memcpy(h->magic, SM_SNAPSHOT_MAGIC, sizeof(h->magic));
    h->format_version = SM_SNAPSHOT_FORMAT_VERSION;
    h->header_bytes = sizeof(*h);
    h->memory_bytes = vm->mem.total_bytes;
    h->n_vcpus = vm->n_vcpus;
    h->flags = flags;
    h->payload_bytes = payload_bytes;
    h->n_devices = vm->n_virtio;
    h->device_record_bytes = sizeof(sm_virtio_mmio_state);
    h->checksum = snapshot_checksum(buf);

    char path[SM_SNAPSHOT_PATH_BYTES], tmp[SM_SNAPSHOT_PATH_BYTES];
    if (path_join(path, dir, SM_SNAPSHOT_STATE_FILE) < 0 ||
        path_join(tmp, dir, SM_SNAPSHOT_STATE_FILE ".tmp") < 0) {
        snprintf(err, err_len, "snapshot: directory path too long");
        goto out;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        snprintf(err, err_len, "snapshot: cannot create %.300s: %s", tmp, strerror(errno));
        goto out;
    }
    if (write_all(fd, buf, sizeof(*h) + payload_bytes, 0) < 0 || fsync(fd) < 0) {
        snprintf(err, err_len, "snapshot: writing %.300s failed: %s", tmp, strerror(errno));
        close(fd);
        unlink(tmp);
        goto out;
    }
    close(fd);
    if (rename(tmp, path) < 0) {
        snprintf(err, err_len, "snapshot: renaming %.300s failed: %s", tmp, strerror(errno));
        unlink(tmp);
        goto out;
    }
    rc = 0;
out:
    for (uint32_t i = 0; i < vm->n_virtio; i++)
        free(extras[i]);
    free(records);
    free(buf);
    return rc;
}

int sm_vm_snapshot(sm_vm *vm, const char *dir)
{
    if (!vm)
        return SM_ERR_INVALID_ARGUMENT;
    if (!dir || !*dir) {
        sm_vm_set_error(vm, "snapshot: a directory is required");
        return SM_ERR_INVALID_ARGUMENT;
    }
    for (uint32_t i = 0; i < vm->n_virtio; i++) {
        const char *refusal = sm_virtio_mmio_snapshot_refusal(vm->virtio[i]);
        if (refusal) {
            sm_vm_set_error(vm, "snapshot: %s cannot be snapshotted: %s", vm->virtio[i]->name, refusal);
            return SM_ERR_BAD_STATE;
        }
    }
    int state = sm_vm_get_state(vm);
    if (state != SM_STATE_RUNNING && state != SM_STATE_PAUSED) {
        sm_vm_set_error(vm, "snapshot: VM is %s; only a running or paused VM can be snapshotted",
                        sm_vm_state_name(state));
        return SM_ERR_BAD_STATE;
    }
    if (state == SM_STATE_RUNNING) {
        int rc = sm_vm_pause(vm);
        if (rc != SM_OK)
            return rc; /* pause set the message */
    }
    char err[SM_ERROR_MESSAGE_BYTES] = "";
    char path[SM_SNAPSHOT_PATH_BYTES];
    int rc = SM_OK;
    if (mkdir(dir, 0700) < 0 && errno != EEXIST) {
        snprintf(err, sizeof(err), "snapshot: cannot create directory %s: %s", dir, strerror(errno));
        rc = SM_ERR_INVALID_ARGUMENT;
    } else if (path_join(path, dir, SM_SNAPSHOT_MEMORY_FILE) < 0) {
        snprintf(err, sizeof(err), "snapshot: directory path too long");
        rc = SM_ERR_INVALID_ARGUMENT;
    } else {
        for (uint32_t i = 0; i < vm->n_vcpus; i++)
            complete_pending_io(&vm->vcpus[i]);
        if (save_state(vm, dir, err, sizeof(err)) < 0 || write_memory(vm, path, err, sizeof(err)) < 0)
            rc = SM_ERR_KVM_IOCTL;
    }
    if (state == SM_STATE_RUNNING)
        sm_vm_resume(vm);
    if (rc != SM_OK)
        sm_vm_set_error(vm, "%s", err);
    return rc;
}

/* ---- restore ------------------------------------------------------------------------ */

static int snapshot_error(char *err, size_t err_len, sm_snapshot_error e, const char *detail)
{
    snprintf(err, err_len, "%s: %s", SM_SNAPSHOT_ERROR_MESSAGES[e], detail);
    (void)e;
    return SM_ERR_INVALID_ARGUMENT;
}

/* The payload without the devices' extra state: what the header's counts fix. */
static uint64_t fixed_payload_bytes(const sm_snapshot_header *h)
{
    return sizeof(sm_snapshot_vm_state) + (uint64_t)h->n_vcpus * sizeof(sm_snapshot_vcpu_state) +
           (uint64_t)h->n_devices * sizeof(sm_virtio_mmio_state);
}

/* Reads and validates state.bin; *out is malloc'd (header + payload). */
static int load_state(const char *dir, uint8_t **out, char *err, size_t err_len)
{
    char path[SM_SNAPSHOT_PATH_BYTES], detail[SM_SNAPSHOT_PATH_BYTES + 128];
    *out = NULL;
    if (path_join(path, dir, SM_SNAPSHOT_STATE_FILE) < 0)
        return snapshot_error(err, err_len, SM_SNAPSHOT_ERR_OPEN, "directory path too long");
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        snprintf(detail, sizeof(detail), "%s: %s", path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return snapshot_error(err, err_len, SM_SNAPSHOT_ERR_OPEN, detail);
    }
    size_t max_bytes = sizeof(sm_snapshot_header) + sizeof(sm_snapshot_vm_state) +
                       SM_MAX_VCPUS * sizeof(sm_snapshot_vcpu_state) +
                       SM_MAX_VIRTIO_DEVICES * (sizeof(sm_virtio_mmio_state) +
                                                (size_t)SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES);
    if ((uint64_t)st.st_size < sizeof(sm_snapshot_header) || (uint64_t)st.st_size > max_bytes) {
        close(fd);
        snprintf(detail, sizeof(detail), "%s is %lld bytes", path, (long long)st.st_size);
        return snapshot_error(err, err_len, (uint64_t)st.st_size < sizeof(sm_snapshot_header)
                                                ? SM_SNAPSHOT_ERR_TRUNCATED : SM_SNAPSHOT_ERR_LAYOUT,
                              detail);
    }
    uint8_t *buf = malloc((size_t)st.st_size);
    size_t got = 0;
    while (buf && got < (size_t)st.st_size) {
        ssize_t n = pread(fd, buf + got, (size_t)st.st_size - got, (off_t)got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    if (!buf || got != (size_t)st.st_size) {
        free(buf);
        return snapshot_error(err, err_len, SM_SNAPSHOT_ERR_OPEN, "reading state.bin failed");
    }
    const sm_snapshot_header *h = (const sm_snapshot_header *)(const void *)buf;
    int rc = SM_OK;
    if (memcmp(h->magic, SM_SNAPSHOT_MAGIC, sizeof(h->magic)) != 0) {
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_MAGIC, path);
    } else if (h->format_version != SM_SNAPSHOT_FORMAT_VERSION) {
        snprintf(detail, sizeof(detail), "version %u, this core reads version %u", h->format_version,
                 SM_SNAPSHOT_FORMAT_VERSION);
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_VERSION, detail);
    } else if (h->header_bytes != sizeof(*h) || h->n_vcpus < 1 || h->n_vcpus > SM_MAX_VCPUS ||
               h->memory_bytes == 0 || h->memory_bytes % SM_MIB_BYTES != 0 ||
               h->n_devices > SM_MAX_VIRTIO_DEVICES ||
               h->device_record_bytes != sizeof(sm_virtio_mmio_state) ||
               h->payload_bytes < fixed_payload_bytes(h) ||
               h->payload_bytes - fixed_payload_bytes(h) >
                   (uint64_t)h->n_devices * SM_VIRTIO_SNAPSHOT_EXTRA_MAX_BYTES) {
        snprintf(detail, sizeof(detail), "header: %u vCPUs, %u devices of %u bytes, %llu bytes of "
                 "memory, %llu payload bytes", h->n_vcpus, h->n_devices, h->device_record_bytes,
                 (unsigned long long)h->memory_bytes, (unsigned long long)h->payload_bytes);
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_LAYOUT, detail);
    } else if ((uint64_t)st.st_size != sizeof(*h) + h->payload_bytes) {
        snprintf(detail, sizeof(detail), "state.bin is %lld bytes, the header says %llu",
                 (long long)st.st_size, (unsigned long long)(sizeof(*h) + h->payload_bytes));
        rc = snapshot_error(err, err_len, (uint64_t)st.st_size < sizeof(*h) + h->payload_bytes
                                              ? SM_SNAPSHOT_ERR_TRUNCATED : SM_SNAPSHOT_ERR_LAYOUT,
                            detail);
    } else if (snapshot_checksum(buf) != h->checksum) {
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_CHECKSUM, path);
    } else {
        const sm_snapshot_vm_state *vs = (const sm_snapshot_vm_state *)(const void *)(buf + sizeof(*h));
        const sm_snapshot_vcpu_state *cs = (const sm_snapshot_vcpu_state *)(const void *)(vs + 1);
        if (vs->uart.rx_len > SM_UART_RX_FIFO_BYTES)
            rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_LAYOUT, "UART FIFO length");
        for (uint32_t i = 0; rc == SM_OK && i < h->n_vcpus; i++)
            if (cs[i].n_msrs > SM_SNAPSHOT_MAX_MSRS)
                rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_LAYOUT, "MSR count");
        const sm_virtio_mmio_state *ds = (const sm_virtio_mmio_state *)(const void *)(cs + h->n_vcpus);
        uint64_t extra_bytes = 0;
        for (uint32_t i = 0; rc == SM_OK && i < h->n_devices; i++) {
            const char *why = sm_virtio_mmio_state_check(&ds[i]);
            if (why) {
                snprintf(detail, sizeof(detail), "device record %u: %s", i, why);
                rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_LAYOUT, detail);
            }
            extra_bytes += ds[i].extra_len;
        }
        if (rc == SM_OK && fixed_payload_bytes(h) + extra_bytes != h->payload_bytes) {
            snprintf(detail, sizeof(detail), "the device records' extra state is %llu bytes, the "
                     "payload has %llu after the records", (unsigned long long)extra_bytes,
                     (unsigned long long)(h->payload_bytes - fixed_payload_bytes(h)));
            rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_LAYOUT, detail);
        }
    }
    if (rc != SM_OK) {
        free(buf);
        return rc;
    }
    *out = buf;
    return SM_OK;
}

static int restore_vcpu(sm_vcpu *v, const sm_snapshot_vcpu_state *s, uint32_t flags, char *err,
                        size_t err_len)
{
    const char *what = NULL;
    struct kvm_vcpu_events events = s->events;
    if (ioctl(v->fd, KVM_SET_SREGS, &s->sregs) < 0)
        what = "KVM_SET_SREGS";
    else if ((flags & SM_SNAPSHOT_FLAG_XSAVE) && ioctl(v->fd, KVM_SET_XCRS, &s->xcrs) < 0)
        what = "KVM_SET_XCRS";
    else if ((flags & SM_SNAPSHOT_FLAG_XSAVE) && ioctl(v->fd, KVM_SET_XSAVE, &s->xsave) < 0)
        what = "KVM_SET_XSAVE";
    else if (!(flags & SM_SNAPSHOT_FLAG_XSAVE) && ioctl(v->fd, KVM_SET_FPU, &s->fpu) < 0)
        what = "KVM_SET_FPU";
    else if (ioctl(v->fd, KVM_SET_LAPIC, &s->lapic) < 0)
        what = "KVM_SET_LAPIC";
    else if (ioctl(v->fd, KVM_SET_MP_STATE, &s->mp_state) < 0)
        what = "KVM_SET_MP_STATE";
    else if (ioctl(v->fd, KVM_SET_REGS, &s->regs) < 0)
        what = "KVM_SET_REGS";
    else if (ioctl(v->fd, KVM_SET_VCPU_EVENTS, &events) < 0)
        what = "KVM_SET_VCPU_EVENTS";
    if (what) {
        snprintf(err, err_len, "snapshot restore: %s on vCPU %u failed: %s", what, v->index,
                 strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry entries[SM_SNAPSHOT_MAX_MSRS];
    } msrs;
    memset(&msrs, 0, sizeof(msrs));
    msrs.hdr.nmsrs = s->n_msrs;
    memcpy(msrs.entries, s->msrs, s->n_msrs * sizeof(s->msrs[0]));
    int n = ioctl(v->fd, KVM_SET_MSRS, &msrs);
    if (n != (int)s->n_msrs) {
        snprintf(err, err_len, "snapshot restore: KVM_SET_MSRS on vCPU %u set %d of %u MSRs "
                 "(first failing: 0x%x)", v->index, n, s->n_msrs,
                 n >= 0 && (uint32_t)n < s->n_msrs ? s->msrs[n].index : 0);
        return SM_ERR_KVM_IOCTL;
    }
    return SM_OK;
}

static void restore_uart(sm_uart *u, const sm_snapshot_uart_state *s)
{
    pthread_mutex_lock(&u->lock);
    u->ier = s->ier;
    u->lcr = s->lcr;
    u->mcr = s->mcr;
    u->lsr_extra = s->lsr_extra;
    u->msr = s->msr;
    u->scr = s->scr;
    u->dll = s->dll;
    u->dlm = s->dlm;
    u->fcr = s->fcr;
    u->thr_interrupt_pending = s->thr_interrupt_pending;
    u->rx_head = 0;
    u->rx_len = s->rx_len;
    memcpy(u->rx, s->rx, s->rx_len);
    pthread_mutex_unlock(&u->lock);
}

static int restore_vm_state(struct sm_vm *vm, const sm_snapshot_vm_state *vs, char *err,
                            size_t err_len)
{
    struct kvm_pit_state2 pit = vs->pit;
    struct kvm_clock_data clock = vs->clock;
    struct kvm_irqchip chips[3] = {vs->pic_master, vs->pic_slave, vs->ioapic};
    clock.flags = 0; /* the saved flags describe the old host's clock, not inputs */
    const char *what = NULL;
    if (ioctl(vm->vm_fd, KVM_SET_PIT2, &pit) < 0)
        what = "KVM_SET_PIT2";
    else if (ioctl(vm->vm_fd, KVM_SET_CLOCK, &clock) < 0)
        what = "KVM_SET_CLOCK";
    for (int i = 0; !what && i < 3; i++)
        if (ioctl(vm->vm_fd, KVM_SET_IRQCHIP, &chips[i]) < 0)
            what = "KVM_SET_IRQCHIP";
    if (what) {
        snprintf(err, err_len, "snapshot restore: %s failed: %s", what, strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    restore_uart(vm->uart, &vs->uart);
    return SM_OK;
}

static void append_name(char *list, size_t len, const char *name)
{
    size_t used = strlen(list);
    snprintf(list + used, len - used, "%s%s", used ? ", " : "", name);
}

/* The restore's devices must be the snapshot's: the same names (so kinds) in the same order. */
static int check_device_list(struct sm_vm *vm, const sm_virtio_mmio_state *ds, uint32_t n_devices,
                             char *err, size_t err_len)
{
    int same = vm->n_virtio == n_devices;
    for (uint32_t i = 0; same && i < n_devices; i++)
        same = strcmp(ds[i].name, vm->virtio[i]->name) == 0 &&
               ds[i].device_id == vm->virtio[i]->ops->device_id;
    if (same)
        return SM_OK;
    char in_snapshot[SM_MAX_VIRTIO_DEVICES * SM_VIRTIO_NAME_BYTES] = "";
    char in_restore[sizeof(in_snapshot)] = "";
    for (uint32_t i = 0; i < n_devices; i++)
        append_name(in_snapshot, sizeof(in_snapshot), ds[i].name);
    for (uint32_t i = 0; i < vm->n_virtio; i++)
        append_name(in_restore, sizeof(in_restore), vm->virtio[i]->name);
    char detail[sizeof(in_snapshot) * 2 + 64];
    snprintf(detail, sizeof(detail), "the snapshot has [%s], the restore's devices are [%s]",
             in_snapshot, in_restore);
    return snapshot_error(err, err_len, SM_SNAPSHOT_ERR_DEVICE_LIST, detail);
}

static int restore_devices(struct sm_vm *vm, const sm_virtio_mmio_state *ds, char *err, size_t err_len)
{
    const uint8_t *extra = (const uint8_t *)(ds + vm->n_virtio); /* load_state checked the lengths */
    for (uint32_t i = 0; i < vm->n_virtio; i++) {
        char detail[SM_ERROR_MESSAGE_BYTES];
        if (sm_virtio_mmio_restore(vm->virtio[i], &ds[i], extra, detail, sizeof(detail)) < 0) {
            snprintf(err, err_len, "snapshot restore: %s", detail);
            return SM_ERR_INVALID_ARGUMENT;
        }
        extra += ds[i].extra_len;
    }
    return SM_OK;
}

int sm_vm_restore(const char *dir, const sm_vm_config *devices, int start_running, sm_vm **out,
                  char *err, size_t err_len)
{
    char dummy[8];
    if (!err || !err_len) {
        err = dummy;
        err_len = sizeof(dummy);
    }
    err[0] = 0;
    if (!dir || !*dir || !out) {
        snprintf(err, err_len, "snapshot restore: a directory and out are required");
        return SM_ERR_INVALID_ARGUMENT;
    }
    *out = NULL;
    uint8_t *buf;
    int rc = load_state(dir, &buf, err, err_len);
    if (rc != SM_OK)
        return rc;
    const sm_snapshot_header *h = (const sm_snapshot_header *)(const void *)buf;
    const sm_snapshot_vm_state *vs = (const sm_snapshot_vm_state *)(const void *)(buf + sizeof(*h));
    const sm_snapshot_vcpu_state *cs = (const sm_snapshot_vcpu_state *)(const void *)(vs + 1);
    const sm_virtio_mmio_state *ds = (const sm_virtio_mmio_state *)(const void *)(cs + h->n_vcpus);

    char path[SM_SNAPSHOT_PATH_BYTES], detail[SM_SNAPSHOT_PATH_BYTES + 128];
    int fd = -1;
    struct stat st;
    if (path_join(path, dir, SM_SNAPSHOT_MEMORY_FILE) < 0) {
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_OPEN, "directory path too long");
    } else if ((fd = open(path, O_RDONLY | O_CLOEXEC)) < 0 || fstat(fd, &st) < 0) {
        snprintf(detail, sizeof(detail), "%s: %s", path, strerror(errno));
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_OPEN, detail);
    } else if ((uint64_t)st.st_size != h->memory_bytes) {
        snprintf(detail, sizeof(detail), "%s is %lld bytes, the header says %llu", path,
                 (long long)st.st_size, (unsigned long long)h->memory_bytes);
        rc = snapshot_error(err, err_len, SM_SNAPSHOT_ERR_MEMORY_SIZE, detail);
    }
    struct sm_vm *vm = NULL;
    if (rc == SM_OK) {
        sm_vm_config c;
        memset(&c, 0, sizeof(c));
        if (devices)
            c = *devices;
        c.memory_mib = (uint32_t)(h->memory_bytes / SM_MIB_BYTES);
        c.vcpus = h->n_vcpus;
        c.kernel_path = "(snapshot)"; /* not loaded: memory comes from memory.bin */
        c.initrd_path = NULL;
        c.cmdline = NULL;
        char cerr[SM_ERROR_MESSAGE_BYTES];
        rc = sm_vm_create_internal(&c, fd, &vm, cerr, sizeof(cerr));
        if (rc != SM_OK)
            snprintf(err, err_len, "snapshot restore: creating the VM failed: %s", cerr);
    }
    if (fd >= 0)
        close(fd); /* the mappings keep the file */
    if (rc == SM_OK)
        rc = check_device_list(vm, ds, h->n_devices, err, err_len);
    if (rc == SM_OK)
        rc = restore_vm_state(vm, vs, err, err_len);
    for (uint32_t i = 0; rc == SM_OK && i < h->n_vcpus; i++)
        rc = restore_vcpu(&vm->vcpus[i], &cs[i], h->flags, err, err_len);
    /* Devices last: a restored device may interrupt the guest (vsock's reset event), which
     * must land in the restored irqchip, not be overwritten by it. */
    if (rc == SM_OK)
        rc = restore_devices(vm, ds, err, err_len);
    free(buf);
    if (rc == SM_OK && start_running) {
        rc = sm_vm_start(vm);
        if (rc != SM_OK) {
            char msg[SM_ERROR_MESSAGE_BYTES];
            sm_vm_last_error(vm, msg, sizeof(msg));
            snprintf(err, err_len, "snapshot restore: start failed: %s", msg);
        }
    }
    if (rc != SM_OK) {
        sm_vm_destroy(vm);
        return rc;
    }
    *out = vm;
    return SM_OK;
}

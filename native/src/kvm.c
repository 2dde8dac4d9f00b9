/* kvm.c — /dev/kvm: API checks, VM creation, memslots, irqchip, PIT, CPUID, vCPU fds. */
#define _GNU_SOURCE
#include "sm_internal.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define SM_KVM_API_VERSION 12
#define SM_CPUID_MAX_ENTRIES 256
#define SM_CPUID_HYPERVISOR_BIT_ECX (1u << 31)

typedef struct sm_kvm_extension {
    int cap;
    const char *name;
} sm_kvm_extension;

/* Every extension the core relies on, by its KVM_CAP_ name for the error message. */
static const sm_kvm_extension SM_REQUIRED_EXTENSIONS[] = {
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP"},
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"},
    {KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"},
    {KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"},
    {KVM_CAP_SET_IDENTITY_MAP_ADDR, "KVM_CAP_SET_IDENTITY_MAP_ADDR"},
};

static int check_api(int kvm_fd, char *err, size_t err_len)
{
    int version = ioctl(kvm_fd, KVM_GET_API_VERSION, 0);
    if (version != SM_KVM_API_VERSION) {
        snprintf(err, err_len, "KVM_GET_API_VERSION returned %d, need %d", version,
                 SM_KVM_API_VERSION);
        return SM_ERR_KVM_API_VERSION;
    }
    for (size_t i = 0; i < sizeof(SM_REQUIRED_EXTENSIONS) / sizeof(SM_REQUIRED_EXTENSIONS[0]); i++) {
        if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, SM_REQUIRED_EXTENSIONS[i].cap) <= 0) {
            snprintf(err, err_len, "/dev/kvm lacks required extension %s",
                     SM_REQUIRED_EXTENSIONS[i].name);
            return SM_ERR_KVM_MISSING_EXTENSION;
        }
    }
    return SM_OK;
}

int sm_kvm_check(char *err, size_t err_len)
{
    char dummy[8];
    if (!err) {
        err = dummy;
        err_len = sizeof(dummy);
    }
    int fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        snprintf(err, err_len, "cannot open /dev/kvm: %s", strerror(errno));
        return SM_ERR_KVM_UNAVAILABLE;
    }
    int rc = check_api(fd, err, err_len);
    if (rc == SM_OK)
        snprintf(err, err_len, "ok");
    close(fd);
    return rc;
}

int sm_kvm_open(struct sm_vm *vm, char *err, size_t err_len)
{
    vm->kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (vm->kvm_fd < 0) {
        snprintf(err, err_len, "cannot open /dev/kvm: %s", strerror(errno));
        return SM_ERR_KVM_UNAVAILABLE;
    }
    int rc = check_api(vm->kvm_fd, err, err_len);
    if (rc != SM_OK)
        return rc;
    int run_bytes = ioctl(vm->kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_bytes <= 0) {
        snprintf(err, err_len, "KVM_GET_VCPU_MMAP_SIZE failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    vm->run_mmap_bytes = (size_t)run_bytes;
    return SM_OK;
}

static int get_supported_cpuid(struct sm_vm *vm, char *err, size_t err_len)
{
    size_t bytes = sizeof(struct kvm_cpuid2) + SM_CPUID_MAX_ENTRIES * sizeof(struct kvm_cpuid_entry2);
    vm->cpuid = calloc(1, bytes);
    if (!vm->cpuid) {
        snprintf(err, err_len, "out of memory for CPUID entries");
        return SM_ERR_OUT_OF_MEMORY;
    }
    vm->cpuid->nent = SM_CPUID_MAX_ENTRIES;
    if (ioctl(vm->kvm_fd, KVM_GET_SUPPORTED_CPUID, vm->cpuid) < 0) {
        snprintf(err, err_len, "KVM_GET_SUPPORTED_CPUID failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    return SM_OK;
}

int sm_kvm_setup_vm(struct sm_vm *vm, char *err, size_t err_len)
{
    vm->vm_fd = ioctl(vm->kvm_fd, KVM_CREATE_VM, 0);
    if (vm->vm_fd < 0) {
        snprintf(err, err_len, "KVM_CREATE_VM failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    if (ioctl(vm->vm_fd, KVM_SET_TSS_ADDR, (unsigned long)SM_KVM_TSS_GPA) < 0) {
        snprintf(err, err_len, "KVM_SET_TSS_ADDR failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    uint64_t identity = SM_KVM_IDENTITY_MAP_GPA;
    if (ioctl(vm->vm_fd, KVM_SET_IDENTITY_MAP_ADDR, &identity) < 0) {
        snprintf(err, err_len, "KVM_SET_IDENTITY_MAP_ADDR failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    for (uint32_t i = 0; i < vm->mem.n_regions; i++) {
        struct kvm_userspace_memory_region region = {
            .slot = i,
            .guest_phys_addr = vm->mem.regions[i].gpa,
            .memory_size = vm->mem.regions[i].size_bytes,
            .userspace_addr = (uint64_t)(uintptr_t)vm->mem.regions[i].host,
        };
        if (ioctl(vm->vm_fd, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
            snprintf(err, err_len, "KVM_SET_USER_MEMORY_REGION slot %u failed: %s", i,
                     strerror(errno));
            return SM_ERR_KVM_IOCTL;
        }
    }
    if (ioctl(vm->vm_fd, KVM_CREATE_IRQCHIP, 0) < 0) {
        snprintf(err, err_len, "KVM_CREATE_IRQCHIP failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    /* The IOAPIC's id follows the vCPUs' APIC ids (0 .. n-1) so the MP table names every APIC
     * once. KVM reads back only the id's low 4 bits to the guest: unique up to 15 vCPUs, and
     * Linux (xAPIC, 64-bit) never checks it. */
    struct kvm_irqchip ioapic = {.chip_id = KVM_IRQCHIP_IOAPIC};
    if (ioctl(vm->vm_fd, KVM_GET_IRQCHIP, &ioapic) < 0) {
        snprintf(err, err_len, "KVM_GET_IRQCHIP (IOAPIC) failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    ioapic.chip.ioapic.id = vm->n_vcpus;
    if (ioctl(vm->vm_fd, KVM_SET_IRQCHIP, &ioapic) < 0) {
        snprintf(err, err_len, "KVM_SET_IRQCHIP (IOAPIC id) failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    struct kvm_pit_config pit = {.flags = KVM_PIT_SPEAKER_DUMMY};
    if (ioctl(vm->vm_fd, KVM_CREATE_PIT2, &pit) < 0) {
        snprintf(err, err_len, "KVM_CREATE_PIT2 failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    /* Optional: instruction bytes in emulation-failure exits (newer kernels). */
    if (ioctl(vm->kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_EXIT_ON_EMULATION_FAILURE) > 0) {
        struct kvm_enable_cap cap = {.cap = KVM_CAP_EXIT_ON_EMULATION_FAILURE, .args = {1}};
        (void)ioctl(vm->vm_fd, KVM_ENABLE_CAP, &cap);
    }
    return get_supported_cpuid(vm, err, err_len);
}

/* Per-vCPU CPUID: APIC ids, the hypervisor bit, topology leaves. */
static int set_vcpu_cpuid(struct sm_vm *vm, sm_vcpu *vcpu, char *err, size_t err_len)
{
    size_t bytes = sizeof(struct kvm_cpuid2) + vm->cpuid->nent * sizeof(struct kvm_cpuid_entry2);
    struct kvm_cpuid2 *c = malloc(bytes);
    if (!c) {
        snprintf(err, err_len, "out of memory for CPUID");
        return SM_ERR_OUT_OF_MEMORY;
    }
    memcpy(c, vm->cpuid, bytes);
    for (uint32_t i = 0; i < c->nent; i++) {
        struct kvm_cpuid_entry2 *e = &c->entries[i];
        switch (e->function) {
        case 1:
            e->ebx = (e->ebx & 0x0000ffffu) | (vm->n_vcpus << 16) | (vcpu->index << 24);
            e->ecx |= SM_CPUID_HYPERVISOR_BIT_ECX;
            break;
        case 0xb:
        case 0x1f:
            e->edx = vcpu->index; /* x2APIC id */
            break;
        default:
            break;
        }
    }
    int rc = ioctl(vcpu->fd, KVM_SET_CPUID2, c);
    int saved = errno;
    free(c);
    if (rc < 0) {
        snprintf(err, err_len, "KVM_SET_CPUID2 on vCPU %u failed: %s", vcpu->index,
                 strerror(saved));
        return SM_ERR_KVM_IOCTL;
    }
    return SM_OK;
}

int sm_kvm_create_vcpus(struct sm_vm *vm, char *err, size_t err_len)
{
    for (uint32_t i = 0; i < vm->n_vcpus; i++) {
        sm_vcpu *v = &vm->vcpus[i];
        v->vm = vm;
        v->index = i;
        v->fd = ioctl(vm->vm_fd, KVM_CREATE_VCPU, (unsigned long)i);
        if (v->fd < 0) {
            snprintf(err, err_len, "KVM_CREATE_VCPU %u failed: %s", i, strerror(errno));
            return SM_ERR_KVM_IOCTL;
        }
        void *run = mmap(NULL, vm->run_mmap_bytes, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
        if (run == MAP_FAILED) {
            v->run = NULL;
            snprintf(err, err_len, "mmap of kvm_run for vCPU %u failed: %s", i, strerror(errno));
            return SM_ERR_KVM_IOCTL;
        }
        v->run = run;
        int rc = set_vcpu_cpuid(vm, v, err, err_len);
        if (rc != SM_OK)
            return rc;
        rc = sm_vcpu_configure(v, err, err_len);
        if (rc != SM_OK)
            return rc;
    }
    return SM_OK;
}

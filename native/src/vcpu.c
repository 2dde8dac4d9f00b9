/* vcpu.c — vCPU register setup, one run-loop thread per vCPU, exit dispatch, kicks. */
#define _GNU_SOURCE
#include "sm_internal.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define SM_CR0_PE 0x1ULL
#define SM_CR0_ET 0x10ULL
#define SM_CR0_NE 0x20ULL
#define SM_CR0_PG 0x80000000ULL
#define SM_CR4_PAE 0x20ULL
#define SM_EFER_LME 0x100ULL
#define SM_EFER_LMA 0x400ULL
#define SM_RFLAGS_RESERVED_BIT 0x2ULL
#define SM_GDT_ENTRIES 4
#define SM_APIC_LVT_LINT0_OFFSET 0x350
#define SM_APIC_LVT_LINT1_OFFSET 0x360
#define SM_APIC_DELIVERY_MODE_EXTINT 0x7
#define SM_APIC_DELIVERY_MODE_NMI 0x4
#define SM_X86_MAX_INSN_BYTES 15
#define SM_X86_RESET_RIP 0xfff0ULL
#define SM_X86_RESET_CS_SELECTOR 0xf000

static __thread struct kvm_run *tls_kvm_run;
static __thread sm_vcpu *tls_vcpu;
static pthread_once_t kick_signal_once = PTHREAD_ONCE_INIT;
static int kick_signal_number;

static void kick_handler(int sig)
{
    (void)sig;
    struct kvm_run *run = tls_kvm_run;
    if (run)
        __atomic_store_n(&run->immediate_exit, 1, __ATOMIC_SEQ_CST);
}

static void install_kick_handler(void)
{
    kick_signal_number = SIGRTMIN + 5;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = 0; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigaction(kick_signal_number, &sa, NULL);
}

static void segment(struct kvm_segment *s, uint16_t selector, uint8_t type, uint8_t code_or_data,
                    uint8_t db, uint8_t l)
{
    memset(s, 0, sizeof(*s));
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = selector;
    s->type = type;
    s->present = 1;
    s->dpl = 0;
    s->db = db;
    s->s = code_or_data;
    s->l = l;
    s->g = 1;
}

static int configure_lapic(sm_vcpu *vcpu, char *err, size_t err_len)
{
    struct kvm_lapic_state lapic;
    if (ioctl(vcpu->fd, KVM_GET_LAPIC, &lapic) < 0) {
        snprintf(err, err_len, "KVM_GET_LAPIC failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    uint32_t *lint0 = (uint32_t *)(void *)&lapic.regs[SM_APIC_LVT_LINT0_OFFSET];
    uint32_t *lint1 = (uint32_t *)(void *)&lapic.regs[SM_APIC_LVT_LINT1_OFFSET];
    *lint0 = (*lint0 & ~0x700u) | (SM_APIC_DELIVERY_MODE_EXTINT << 8);
    *lint1 = (*lint1 & ~0x700u) | (SM_APIC_DELIVERY_MODE_NMI << 8);
    if (ioctl(vcpu->fd, KVM_SET_LAPIC, &lapic) < 0) {
        snprintf(err, err_len, "KVM_SET_LAPIC failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    return SM_OK;
}

int sm_vcpu_configure(sm_vcpu *vcpu, char *err, size_t err_len)
{
    struct sm_vm *vm = vcpu->vm;
    int rc = configure_lapic(vcpu, err, err_len);
    if (rc != SM_OK)
        return rc;

    struct kvm_fpu fpu;
    memset(&fpu, 0, sizeof(fpu));
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    if (ioctl(vcpu->fd, KVM_SET_FPU, &fpu) < 0) {
        snprintf(err, err_len, "KVM_SET_FPU failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    if (vcpu->index != 0)
        return SM_OK; /* APs wait for INIT/SIPI in the in-kernel LAPIC */

    struct kvm_sregs sregs;
    if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0) {
        snprintf(err, err_len, "KVM_GET_SREGS failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    const sm_boot_state *b = &vm->boot;
    sregs.gdt.base = SM_GDT_GPA;
    sregs.gdt.limit = SM_GDT_ENTRIES * 8 - 1;
    sregs.idt.base = SM_IDT_GPA;
    sregs.idt.limit = 0;
    struct kvm_segment data;
    segment(&data, 0x10, 0x3, 1, 1, 0);
    if (b->mode == SM_ENTRY_LONG_MODE) {
        segment(&sregs.cs, 0x8, 0xb, 1, 0, 1);
        sregs.cr3 = SM_PML4_GPA;
        sregs.cr4 = SM_CR4_PAE;
        sregs.cr0 = SM_CR0_PE | SM_CR0_ET | SM_CR0_NE | SM_CR0_PG;
        sregs.efer = SM_EFER_LME | SM_EFER_LMA;
    } else {
        segment(&sregs.cs, 0x8, 0xb, 1, 1, 0);
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.cr0 = SM_CR0_PE | SM_CR0_ET;
        sregs.efer = 0;
    }
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    struct kvm_segment tr;
    segment(&tr, 0x18, 0xb, 0, 0, 0);
    tr.limit = 0xfffff;
    tr.g = 0;
    sregs.tr = tr;
    if (ioctl(vcpu->fd, KVM_SET_SREGS, &sregs) < 0) {
        snprintf(err, err_len, "KVM_SET_SREGS failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    struct kvm_regs regs;
    memset(&regs, 0, sizeof(regs));
    regs.rflags = SM_RFLAGS_RESERVED_BIT;
    regs.rip = b->rip;
    regs.rsp = b->rsp;
    regs.rbp = b->rsp;
    regs.rsi = b->rsi;
    regs.rdi = b->rdi;
    regs.rbx = b->rbx;
    if (ioctl(vcpu->fd, KVM_SET_REGS, &regs) < 0) {
        snprintf(err, err_len, "KVM_SET_REGS failed: %s", strerror(errno));
        return SM_ERR_KVM_IOCTL;
    }
    return SM_OK;
}

/* Read the instruction at the vCPU's RIP through its own page tables. */
static uint32_t fetch_instruction(sm_vcpu *vcpu, uint64_t *rip_out, uint8_t *bytes)
{
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    *rip_out = 0;
    if (ioctl(vcpu->fd, KVM_GET_REGS, &regs) < 0)
        return 0;
    *rip_out = regs.rip;
    if (ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
        return 0;
    uint64_t linear = sregs.cs.base + regs.rip;
    uint32_t got = 0;
    while (got < SM_X86_MAX_INSN_BYTES) {
        struct kvm_translation tr = {.linear_address = linear + got};
        if (ioctl(vcpu->fd, KVM_TRANSLATE, &tr) < 0 || !tr.valid)
            break;
        uint64_t page_left = SM_PAGE_SIZE_BYTES - (tr.physical_address % SM_PAGE_SIZE_BYTES);
        uint32_t want = SM_X86_MAX_INSN_BYTES - got;
        if (want > page_left)
            want = (uint32_t)page_left;
        if (sm_memory_read(&vcpu->vm->mem, tr.physical_address, bytes + got, want) < 0)
            break;
        got += want;
    }
    return got;
}

static int format_bytes(char *buf, size_t len, const uint8_t *bytes, uint32_t n)
{
    size_t pos = 0;
    buf[0] = 0;
    for (uint32_t i = 0; i < n && pos + 4 < len; i++)
        pos += (size_t)snprintf(buf + pos, len - pos, "%s%02x", i ? " " : "", bytes[i]);
    return (int)pos;
}

static const char *internal_suberror_name(uint32_t sub)
{
    switch (sub) {
    case KVM_INTERNAL_ERROR_EMULATION: return "KVM_INTERNAL_ERROR_EMULATION";
    case KVM_INTERNAL_ERROR_SIMUL_EX: return "KVM_INTERNAL_ERROR_SIMUL_EX";
    case KVM_INTERNAL_ERROR_DELIVERY_EV: return "KVM_INTERNAL_ERROR_DELIVERY_EV";
    case KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: return "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON";
    default: return "unknown suberror";
    }
}

/* A fatal exit: collect RIP and instruction bytes and end the VM. */
static void fatal_exit(sm_vcpu *vcpu, int reason, uint32_t suberror, const uint8_t *kvm_bytes,
                       uint32_t kvm_nbytes, const char *what)
{
    sm_exit_info d;
    memset(&d, 0, sizeof(d));
    d.reason = reason;
    d.kvm_exit_reason = vcpu->run->exit_reason;
    d.kvm_suberror = suberror;
    d.vcpu = vcpu->index;
    uint8_t fetched[16] = {0};
    uint32_t n = fetch_instruction(vcpu, &d.rip, fetched);
    if (kvm_bytes && kvm_nbytes) {
        if (kvm_nbytes > 15)
            kvm_nbytes = 15;
        memcpy(d.insn_bytes, kvm_bytes, kvm_nbytes);
        d.insn_len = kvm_nbytes;
    } else {
        memcpy(d.insn_bytes, fetched, n);
        d.insn_len = n;
    }
    char hex[64];
    format_bytes(hex, sizeof(hex), d.insn_bytes, d.insn_len);
    snprintf(d.message, sizeof(d.message),
             "%s on vCPU %u at RIP 0x%llx, instruction bytes [%s]", what, vcpu->index,
             (unsigned long long)d.rip, d.insn_len ? hex : "unreadable");
    sm_vm_end_detail(vcpu->vm, &d, SM_STATE_FAILED);
}

void sm_vcpu_fail_current(struct sm_vm *vm, int reason, const char *what)
{
    if (tls_vcpu && tls_vcpu->vm == vm)
        fatal_exit(tls_vcpu, reason, 0, NULL, 0, what);
    else
        sm_vm_end(vm, SM_STATE_FAILED, reason, "%s", what);
}

/* AMD SVM (and so KVM in a nested L1) puts a vCPU that shut down back at the reset vector
 * before the exit reaches us: its RIP then says nothing about where the guest faulted. */
static int at_reset_vector(sm_vcpu *vcpu)
{
    struct kvm_regs regs;
    struct kvm_sregs sregs;
    if (ioctl(vcpu->fd, KVM_GET_REGS, &regs) < 0 || ioctl(vcpu->fd, KVM_GET_SREGS, &sregs) < 0)
        return 0;
    return regs.rip == SM_X86_RESET_RIP && sregs.cs.selector == SM_X86_RESET_CS_SELECTOR;
}

static void shutdown_exit(sm_vcpu *vcpu)
{
    if (!at_reset_vector(vcpu)) {
        fatal_exit(vcpu, SM_EXIT_TRIPLE_FAULT, 0, NULL, 0,
                   "guest triple fault (exit KVM_EXIT_SHUTDOWN)");
        return;
    }
    sm_exit_info d;
    memset(&d, 0, sizeof(d));
    d.reason = SM_EXIT_TRIPLE_FAULT;
    d.kvm_exit_reason = vcpu->run->exit_reason;
    d.vcpu = vcpu->index;
    d.rip = SM_X86_RESET_RIP;
    snprintf(d.message, sizeof(d.message),
             "guest triple fault (exit KVM_EXIT_SHUTDOWN) on vCPU %u; where it faulted is not "
             "known: KVM had already reset the vCPU (RIP 0x%llx is the reset vector)",
             vcpu->index, (unsigned long long)SM_X86_RESET_RIP);
    sm_vm_end_detail(vcpu->vm, &d, SM_STATE_FAILED);
}

static void handle_internal_error(sm_vcpu *vcpu)
{
    struct kvm_run *run = vcpu->run;
    uint32_t sub = run->internal.suberror;
    char what[256];
    if (sub == KVM_INTERNAL_ERROR_EMULATION) {
        const uint8_t *bytes = NULL;
        uint32_t nbytes = 0;
        if (run->emulation_failure.ndata >= 3 &&
            (run->emulation_failure.flags & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES)) {
            bytes = run->emulation_failure.insn_bytes;
            nbytes = run->emulation_failure.insn_size;
        }
        snprintf(what, sizeof(what),
                 "KVM emulation failure (exit KVM_EXIT_INTERNAL_ERROR, suberror %u %s)", sub,
                 internal_suberror_name(sub));
        fatal_exit(vcpu, SM_EXIT_EMULATION_FAILURE, sub, bytes, nbytes, what);
        return;
    }
    size_t pos = (size_t)snprintf(what, sizeof(what),
                                  "KVM internal error (exit KVM_EXIT_INTERNAL_ERROR, suberror %u %s, data",
                                  sub, internal_suberror_name(sub));
    uint32_t nd = run->internal.ndata;
    if (nd > 4)
        nd = 4;
    for (uint32_t i = 0; i < nd && pos < sizeof(what) - 24; i++)
        pos += (size_t)snprintf(what + pos, sizeof(what) - pos, " 0x%llx",
                                (unsigned long long)run->internal.data[i]);
    snprintf(what + pos, sizeof(what) - pos, ")");
    fatal_exit(vcpu, SM_EXIT_INTERNAL_ERROR, sub, NULL, 0, what);
}

/* Returns 0 to keep running, 1 to leave the run loop. */
static int handle_exit(sm_vcpu *vcpu)
{
    struct kvm_run *run = vcpu->run;
    struct sm_vm *vm = vcpu->vm;
    char what[256];
    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        uint32_t size = run->io.size;
        /* KVM guarantees the data area lies inside the run page; stay defensive. */
        if ((uint64_t)run->io.data_offset + (uint64_t)size * run->io.count > vm->run_mmap_bytes) {
            fatal_exit(vcpu, SM_EXIT_UNHANDLED_IO, 0, NULL, 0, "malformed KVM_EXIT_IO");
            return 1;
        }
        for (uint32_t i = 0; i < run->io.count; i++)
            sm_io_port(vm, run->io.port, data + (size_t)i * size, size,
                       run->io.direction == KVM_EXIT_IO_OUT);
        return 0;
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = run->mmio.len;
        if (len > sizeof(run->mmio.data))
            len = sizeof(run->mmio.data);
        sm_io_mmio(vm, run->mmio.phys_addr, run->mmio.data, len, run->mmio.is_write);
        return 0;
    }
    case KVM_EXIT_SHUTDOWN:
        shutdown_exit(vcpu);
        return 1;
    case KVM_EXIT_INTERNAL_ERROR:
        handle_internal_error(vcpu);
        return 1;
    case KVM_EXIT_FAIL_ENTRY:
        snprintf(what, sizeof(what),
                 "VM entry failed (exit KVM_EXIT_FAIL_ENTRY, hardware reason 0x%llx)",
                 (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        fatal_exit(vcpu, SM_EXIT_FAIL_ENTRY, 0, NULL, 0, what);
        return 1;
    case KVM_EXIT_HLT:
        fatal_exit(vcpu, SM_EXIT_GUEST_HALT, 0, NULL, 0, "guest halted (exit KVM_EXIT_HLT)");
        return 1;
    case KVM_EXIT_SYSTEM_EVENT:
        if (run->system_event.type == KVM_SYSTEM_EVENT_RESET ||
            run->system_event.type == KVM_SYSTEM_EVENT_SHUTDOWN) {
            sm_vm_end(vm, SM_STATE_STOPPED, SM_EXIT_GUEST_RESET,
                      "guest requested %s (exit KVM_EXIT_SYSTEM_EVENT)",
                      run->system_event.type == KVM_SYSTEM_EVENT_RESET ? "reset" : "shutdown");
            return 1;
        }
        snprintf(what, sizeof(what), "guest system event type %u (exit KVM_EXIT_SYSTEM_EVENT)",
                 run->system_event.type);
        fatal_exit(vcpu, SM_EXIT_INTERNAL_ERROR, 0, NULL, 0, what);
        return 1;
    case KVM_EXIT_INTR:
        return 0;
    default:
        snprintf(what, sizeof(what), "unhandled KVM exit reason %u", run->exit_reason);
        fatal_exit(vcpu, SM_EXIT_UNKNOWN_KVM_EXIT, 0, NULL, 0, what);
        return 1;
    }
}

/* Park here while a pause is requested. Returns 1 if the VM must stop. */
static int pause_point(sm_vcpu *vcpu)
{
    struct sm_vm *vm = vcpu->vm;
    if (!__atomic_load_n(&vm->pause_requested, __ATOMIC_ACQUIRE) &&
        !__atomic_load_n(&vm->stop_requested, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&vm->lock);
    int stop = vm->stop_requested;
    if (!stop && vm->pause_requested) {
        vm->vcpus_paused++;
        pthread_cond_broadcast(&vm->cond);
        while (vm->pause_requested && !vm->stop_requested)
            pthread_cond_wait(&vm->cond, &vm->lock);
        vm->vcpus_paused--;
        pthread_cond_broadcast(&vm->cond);
        stop = vm->stop_requested;
    }
    pthread_mutex_unlock(&vm->lock);
    return stop;
}

static void *vcpu_thread(void *arg)
{
    sm_vcpu *vcpu = arg;
    struct sm_vm *vm = vcpu->vm;
    tls_kvm_run = vcpu->run;
    tls_vcpu = vcpu;
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, kick_signal_number);
    pthread_sigmask(SIG_UNBLOCK, &set, NULL);
    char name[16];
    snprintf(name, sizeof(name), "sm-vcpu%u", vcpu->index);
    pthread_setname_np(pthread_self(), name);

    for (;;) {
        if (pause_point(vcpu))
            break;
        int rc = ioctl(vcpu->fd, KVM_RUN, 0);
        if (rc < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                __atomic_store_n(&vcpu->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                continue;
            }
            sm_vm_end(vm, SM_STATE_FAILED, SM_EXIT_KVM_RUN_ERROR, "KVM_RUN on vCPU %u failed: %s",
                      vcpu->index, strerror(errno));
            break;
        }
        if (handle_exit(vcpu))
            break;
    }
    tls_kvm_run = NULL;
    tls_vcpu = NULL;
    pthread_mutex_lock(&vm->lock);
    vm->vcpus_running--;
    pthread_cond_broadcast(&vm->cond);
    pthread_mutex_unlock(&vm->lock);
    return NULL;
}

int sm_vcpu_start_threads(struct sm_vm *vm, char *err, size_t err_len)
{
    pthread_once(&kick_signal_once, install_kick_handler);
    for (uint32_t i = 0; i < vm->n_vcpus; i++) {
        sm_vcpu *v = &vm->vcpus[i];
        pthread_mutex_lock(&vm->lock);
        vm->vcpus_running++;
        pthread_mutex_unlock(&vm->lock);
        int rc = pthread_create(&v->thread, NULL, vcpu_thread, v);
        if (rc != 0) {
            pthread_mutex_lock(&vm->lock);
            vm->vcpus_running--;
            pthread_mutex_unlock(&vm->lock);
            snprintf(err, err_len, "pthread_create for vCPU %u failed: %s", i, strerror(rc));
            return SM_ERR_THREAD;
        }
        v->thread_started = 1;
    }
    return SM_OK;
}

void sm_vcpu_kick_all(struct sm_vm *vm)
{
    for (uint32_t i = 0; i < vm->n_vcpus; i++) {
        sm_vcpu *v = &vm->vcpus[i];
        if (v->thread_started && !pthread_equal(v->thread, pthread_self()))
            pthread_kill(v->thread, kick_signal_number);
    }
}

void sm_vcpu_join_all(struct sm_vm *vm)
{
    for (uint32_t i = 0; i < vm->n_vcpus; i++) {
        sm_vcpu *v = &vm->vcpus[i];
        if (v->thread_started && !pthread_equal(v->thread, pthread_self())) {
            /* A vCPU blocked in KVM_RUN (e.g. an AP waiting for SIPI) needs kicks
             * until it notices stop_requested. */
            for (;;) {
                struct timespec ts;
                clock_gettime(CLOCK_REALTIME, &ts);
                ts.tv_nsec += 20 * 1000 * 1000;
                if (ts.tv_nsec >= 1000000000L) {
                    ts.tv_sec++;
                    ts.tv_nsec -= 1000000000L;
                }
                if (pthread_timedjoin_np(v->thread, NULL, &ts) == 0)
                    break;
                pthread_kill(v->thread, kick_signal_number);
            }
            v->thread_started = 0;
        }
    }
}

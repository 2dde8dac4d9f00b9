/* probe_clock.c — see probe_clock.h. The first call registers a pvclock_vcpu_time_info with
 * KVM (MSR_KVM_SYSTEM_TIME_NEW); KVM keeps it current: system time at a TSC stamp, and the
 * TSC-to-nanoseconds scale. Documentation/virt/kvm/x86/msr.rst. */
#include "probe.h"
#include "probe_clock.h"

#define KVM_CPUID_SIGNATURE 0x40000000u
#define KVM_CPUID_FEATURES 0x40000001u
#define KVM_SIGNATURE_EBX 0x4b4d564bu /* "KVMK" */
#define KVM_SIGNATURE_ECX 0x564b4d56u /* "VMKV" */
#define KVM_SIGNATURE_EDX 0x0000004du /* "M\0\0\0" */
#define KVM_FEATURE_CLOCKSOURCE2 (1u << 3)
#define MSR_KVM_SYSTEM_TIME_NEW 0x4b564d01u
#define KVM_SYSTEM_TIME_ENABLE 1u

struct __attribute__((packed)) pvclock_vcpu_time_info {
    uint32_t version;       /* odd while KVM updates the rest */
    uint32_t pad0;
    uint64_t tsc_timestamp;
    uint64_t system_time;   /* ns at tsc_timestamp */
    uint32_t tsc_to_system_mul;
    int8_t tsc_shift;
    uint8_t flags;
    uint8_t pad[2];
};

/* 32-byte aligned: KVM wants the structure inside one page. */
static volatile struct pvclock_vcpu_time_info time_info __attribute__((aligned(32)));
static int registered; /* 0: not yet, 1: KVM updates time_info, -1: no kvmclock */

static void cpuid(uint32_t leaf, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(0));
}

static uint64_t read_tsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (uint64_t)hi << 32 | lo;
}

static int register_with_kvm(void)
{
    uint32_t a, b, c, d;
    cpuid(KVM_CPUID_SIGNATURE, &a, &b, &c, &d);
    if (a < KVM_CPUID_FEATURES || b != KVM_SIGNATURE_EBX || c != KVM_SIGNATURE_ECX || d != KVM_SIGNATURE_EDX)
        return -1;
    cpuid(KVM_CPUID_FEATURES, &a, &b, &c, &d);
    if (!(a & KVM_FEATURE_CLOCKSOURCE2))
        return -1;
    uint64_t value = (uint64_t)&time_info | KVM_SYSTEM_TIME_ENABLE;
    __asm__ volatile("wrmsr" : : "c"(MSR_KVM_SYSTEM_TIME_NEW), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)));
    return 1;
}

uint64_t clock_ns(void)
{
    if (!registered)
        registered = register_with_kvm();
    if (registered < 0)
        return 0;
    uint32_t version;
    uint64_t ns;
    do {
        version = time_info.version;
        barrier();
        uint64_t delta = read_tsc() - time_info.tsc_timestamp;
        if (time_info.tsc_shift >= 0)
            delta <<= time_info.tsc_shift;
        else
            delta >>= -time_info.tsc_shift;
        ns = time_info.system_time + (uint64_t)(((unsigned __int128)delta * time_info.tsc_to_system_mul) >> 32);
        barrier();
    } while ((version & 1) || version != time_info.version);
    return ns;
}

/* mptable.h — the Intel MultiProcessor Specification 1.4 table that tells a guest without
 * ACPI (our Linux: CONFIG_X86_MPPARSE, no ACPI) how many CPUs it has and how the IOAPIC's
 * pins are wired. Built into a caller's buffer from plain facts; no VM, no KVM. */
#ifndef SM_MPTABLE_H
#define SM_MPTABLE_H

#include <stddef.h>
#include <stdint.h>

/* Linux scans the last KiB of conventional memory (639 KiB) for the floating pointer; the
 * e820 map ends RAM there, so the table is never RAM the guest may reuse. */
#define SM_MPTABLE_GPA 0x9fc00ULL
#define SM_MPTABLE_MAX_BYTES 1024u    /* up to 0xa0000, where the VGA hole starts */
#define SM_MPTABLE_MAX_CPUS 32u
#define SM_MPTABLE_MAX_IOAPIC_PINS 24u
#define SM_MPTABLE_LAPIC_GPA 0xfee00000u
#define SM_MPTABLE_IOAPIC_GPA 0xfec00000u

typedef struct sm_mptable_config {
    uint32_t n_cpus;             /* APIC ids 0 .. n_cpus-1; CPU 0 boots */
    uint32_t cpu_signature;      /* CPUID leaf 1 EAX (family, model, stepping) */
    uint32_t cpu_features;       /* CPUID leaf 1 EDX */
    uint8_t lapic_version;
    uint8_t ioapic_id;
    uint8_t ioapic_version;
    uint8_t ioapic_pins;         /* each pin i is wired to ISA IRQ i (KVM's default routing) */
} sm_mptable_config;

/* Writes the floating pointer then the configuration table into buf, as they go at guest
 * address table_gpa. Returns the bytes written, or 0 if the config is out of range or the
 * table does not fit in len. */
size_t sm_mptable_build(uint8_t *buf, size_t len, uint64_t table_gpa,
                        const sm_mptable_config *cfg);

#endif

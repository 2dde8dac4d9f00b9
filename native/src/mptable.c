/* mptable.c — see mptable.h. Layouts from the MP Specification 1.4, chapter 4: a 16-byte
 * floating pointer, then the configuration table header and its entries, each section with a
 * byte checksum that makes its bytes sum to zero. */
#include "mptable.h"

#include <string.h>

#define MP_FLOATING_BYTES 16u
#define MP_HEADER_BYTES 44u
#define MP_PROCESSOR_BYTES 20u
#define MP_SHORT_ENTRY_BYTES 8u     /* bus, IOAPIC, I/O and local interrupt entries */
#define MP_SPEC_REVISION 4          /* 1.4 */

#define MP_ENTRY_PROCESSOR 0
#define MP_ENTRY_BUS 1
#define MP_ENTRY_IOAPIC 2
#define MP_ENTRY_IO_INTERRUPT 3
#define MP_ENTRY_LOCAL_INTERRUPT 4

#define MP_CPU_ENABLED 0x1
#define MP_CPU_BOOT_PROCESSOR 0x2
#define MP_IOAPIC_ENABLED 0x1
#define MP_INTERRUPT_INT 0          /* vectored, through the IOAPIC's redirection entry */
#define MP_INTERRUPT_NMI 1
#define MP_INTERRUPT_EXTINT 3       /* from the 8259 PIC */
#define MP_FLAGS_CONFORM_TO_BUS 0   /* ISA: edge triggered, active high */
#define MP_ISA_BUS_ID 0
#define MP_ALL_LOCAL_APICS 0xff

static void put16(uint8_t *p, uint16_t v) { memcpy(p, &v, 2); }
static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

/* The byte that makes [p, p+len) sum to zero, given that its own slot reads zero now. */
static uint8_t zero_sum_byte(const uint8_t *p, size_t len)
{
    uint8_t sum = 0;
    for (size_t i = 0; i < len; i++)
        sum = (uint8_t)(sum + p[i]);
    return (uint8_t)(0u - sum);
}

static uint8_t *put_interrupt(uint8_t *p, uint8_t entry, uint8_t type, uint8_t source_irq,
                              uint8_t destination_id, uint8_t destination_pin)
{
    p[0] = entry;
    p[1] = type;
    put16(p + 2, MP_FLAGS_CONFORM_TO_BUS);
    p[4] = MP_ISA_BUS_ID;
    p[5] = source_irq;
    p[6] = destination_id;
    p[7] = destination_pin;
    return p + MP_SHORT_ENTRY_BYTES;
}

size_t sm_mptable_build(uint8_t *buf, size_t len, uint64_t table_gpa,
                        const sm_mptable_config *cfg)
{
    if (!buf || !cfg || cfg->n_cpus < 1 || cfg->n_cpus > SM_MPTABLE_MAX_CPUS ||
        cfg->ioapic_pins < 16 || cfg->ioapic_pins > SM_MPTABLE_MAX_IOAPIC_PINS ||
        cfg->ioapic_id < cfg->n_cpus || table_gpa > UINT32_MAX - SM_MPTABLE_MAX_BYTES)
        return 0;
    size_t entries = (size_t)cfg->n_cpus + 2 + cfg->ioapic_pins + 2;
    size_t config_bytes = MP_HEADER_BYTES + cfg->n_cpus * MP_PROCESSOR_BYTES +
                          (2 + cfg->ioapic_pins + 2) * MP_SHORT_ENTRY_BYTES;
    size_t total = MP_FLOATING_BYTES + config_bytes;
    if (total > len || total > SM_MPTABLE_MAX_BYTES)
        return 0;
    memset(buf, 0, total);

    uint8_t *mpf = buf;
    memcpy(mpf, "_MP_", 4);
    put32(mpf + 4, (uint32_t)(table_gpa + MP_FLOATING_BYTES)); /* the configuration table */
    mpf[8] = 1;                                                /* length in 16-byte units */
    mpf[9] = MP_SPEC_REVISION;
    /* feature byte 1 = 0: a configuration table follows (no default configuration);
     * feature byte 2 = 0: no IMCR, the PIC reaches the CPUs as virtual wire (LINT0). */
    mpf[10] = zero_sum_byte(mpf, MP_FLOATING_BYTES);

    uint8_t *hdr = buf + MP_FLOATING_BYTES;
    memcpy(hdr, "PCMP", 4);
    put16(hdr + 4, (uint16_t)config_bytes);
    hdr[6] = MP_SPEC_REVISION;
    memcpy(hdr + 8, "SUPERMAC", 8);            /* OEM id */
    memcpy(hdr + 16, "NATIVE CORE ", 12);      /* product id */
    put16(hdr + 34, (uint16_t)entries);
    put32(hdr + 36, SM_MPTABLE_LAPIC_GPA);

    uint8_t *p = hdr + MP_HEADER_BYTES;
    for (uint32_t cpu = 0; cpu < cfg->n_cpus; cpu++) {
        p[0] = MP_ENTRY_PROCESSOR;
        p[1] = (uint8_t)cpu;                    /* APIC id: KVM gives vCPU i the APIC id i */
        p[2] = cfg->lapic_version;
        p[3] = MP_CPU_ENABLED | (cpu == 0 ? MP_CPU_BOOT_PROCESSOR : 0);
        put32(p + 4, cfg->cpu_signature);
        put32(p + 8, cfg->cpu_features);
        p += MP_PROCESSOR_BYTES;
    }
    p[0] = MP_ENTRY_BUS;
    p[1] = MP_ISA_BUS_ID;
    memcpy(p + 2, "ISA   ", 6);
    p += MP_SHORT_ENTRY_BYTES;

    p[0] = MP_ENTRY_IOAPIC;
    p[1] = cfg->ioapic_id;
    p[2] = cfg->ioapic_version;
    p[3] = MP_IOAPIC_ENABLED;
    put32(p + 4, SM_MPTABLE_IOAPIC_GPA);
    p += MP_SHORT_ENTRY_BYTES;

    /* Every pin, IRQ i to pin i as KVM routes GSI i: the legacy IRQs (timer 0, COM1 4) and
     * the virtio-mmio devices' (5 and up). Linux allocates IRQs >= 16 only for listed pins. */
    for (uint32_t pin = 0; pin < cfg->ioapic_pins; pin++)
        p = put_interrupt(p, MP_ENTRY_IO_INTERRUPT, MP_INTERRUPT_INT, (uint8_t)pin,
                          cfg->ioapic_id, (uint8_t)pin);
    /* The PIC on the boot CPU's LINT0 (virtual wire), NMI on every CPU's LINT1: how the
     * core programs the local APICs (vcpu.c). */
    p = put_interrupt(p, MP_ENTRY_LOCAL_INTERRUPT, MP_INTERRUPT_EXTINT, 0, 0, 0);
    p = put_interrupt(p, MP_ENTRY_LOCAL_INTERRUPT, MP_INTERRUPT_NMI, 0, MP_ALL_LOCAL_APICS, 1);

    hdr[7] = zero_sum_byte(hdr, config_bytes);
    return total;
}

/* smp probe: finds the MP table the way Linux's mpparse does (the floating pointer in the
 * last KiB of conventional memory or the BIOS area, checksums, the configuration table and
 * its entries), reports what it lists, reads the boot CPU's local APIC id and the IOAPIC's
 * id and version, then starts every other listed CPU with INIT-SIPI-SIPI at its APIC id.
 * Each AP runs a few real-mode instructions: it marks its CPUID APIC id in a byte array
 * and counts itself in. With snap=1 it stops at a snapshot point once the APs are up (halted)
 * and, after the host's byte, starts them all again: the restored APs answer too. */
#include "probe.h"
#include "probe_clock.h"

#define SCAN_EBDA_LAST_KIB 0x9fc00ull
#define SCAN_BIOS_START 0xf0000ull
#define SCAN_BIOS_END 0x100000ull
#define BDA_EBDA_SEGMENT 0x40eull
#define LOW_MEMORY_END 0x100000ull
#define MP_HEADER_BYTES 44u

#define LAPIC_BASE 0xfee00000ull
#define LAPIC_ID 0x20
#define LAPIC_SVR 0xf0
#define LAPIC_ICR_LOW 0x300
#define LAPIC_ICR_HIGH 0x310
#define LAPIC_SVR_ENABLE 0x100
#define LAPIC_ICR_DELIVERY_PENDING (1u << 12)
#define LAPIC_ICR_INIT_ASSERT 0x4500u      /* INIT, level assert, physical destination */
#define LAPIC_ICR_STARTUP 0x4600u          /* SIPI; the vector is the start page number */
#define IOAPIC_BASE 0xfec00000ull
#define IOAPIC_REGSEL 0x00
#define IOAPIC_WINDOW 0x10
#define IOAPIC_REG_ID 0
#define IOAPIC_REG_VERSION 1

/* AP start page (below 1 MiB, free in the core's layout) and the AP's report area. */
#define AP_TRAMPOLINE_GPA 0x8000ull
#define AP_SEEN_GPA 0x8800ull               /* one byte per APIC id */
#define AP_COUNT_GPA 0x8900ull              /* 16-bit count of APs that ran */
#define AP_MAX_APIC_ID 256
#define MAX_CPUS 64

/* Real mode at CS:IP = 0800:0000, DS = 0: cli; xor ax,ax; mov ds,ax; mov eax,1; cpuid;
 * shr ebx,24; mov byte [bx+0x8800],1; lock inc word [0x8900]; hlt; jmp back to hlt. */
static const uint8_t AP_TRAMPOLINE[] = {
    0xfa, 0x31, 0xc0, 0x8e, 0xd8, 0x66, 0xb8, 0x01, 0x00, 0x00, 0x00, 0x0f, 0xa2,
    0x66, 0xc1, 0xeb, 0x18, 0xc6, 0x87, 0x00, 0x88, 0x01, 0xf0, 0xff, 0x06, 0x00, 0x89,
    0xf4, 0xeb, 0xfd,
};

static uint8_t cpu_apic_ids[MAX_CPUS];
static uint32_t n_cpus;
static int bsp_apic_id = -1;

static int fail(const char *why)
{
    put_str("PROBE smp FAIL ");
    put_line(why);
    return 1;
}

static uint8_t byte_sum(uint64_t gpa, uint64_t len)
{
    uint8_t sum = 0;
    for (uint64_t i = 0; i < len; i++)
        sum = (uint8_t)(sum + *(volatile uint8_t *)(gpa + i));
    return sum;
}

static uint32_t rd32(uint64_t gpa) { return *(volatile uint32_t *)gpa; }
static uint16_t rd16(uint64_t gpa) { return *(volatile uint16_t *)gpa; }
static uint8_t rd8(uint64_t gpa) { return *(volatile uint8_t *)gpa; }

/* A floating pointer in [start, start+len): signature, length 1, revision 1 or 4, checksum. */
static uint64_t scan_for_floating_pointer(uint64_t start, uint64_t len)
{
    for (uint64_t at = start; at + 16 <= start + len; at += 16) {
        if (rd32(at) == 0x5f504d5f /* "_MP_" */ && rd8(at + 8) == 1 &&
            (rd8(at + 9) == 1 || rd8(at + 9) == 4) && byte_sum(at, 16) == 0)
            return at;
    }
    return 0;
}

static void put_field(const char *name, uint64_t value)
{
    put_char(' ');
    put_str(name);
    put_char('=');
    put_dec(value);
}

static int read_table(void)
{
    uint64_t mpf = scan_for_floating_pointer(SCAN_EBDA_LAST_KIB, 0x400);
    uint64_t ebda = (uint64_t)rd16(BDA_EBDA_SEGMENT) << 4;
    if (!mpf && ebda)
        mpf = scan_for_floating_pointer(ebda, 0x400);
    if (!mpf)
        mpf = scan_for_floating_pointer(SCAN_BIOS_START, SCAN_BIOS_END - SCAN_BIOS_START);
    if (!mpf)
        return fail("no MP floating pointer with a valid checksum");
    put_str("MP floating-pointer at=");
    put_hex(mpf);
    put_field("revision", rd8(mpf + 9));
    put_field("feature1", rd8(mpf + 11));
    put_char('\n');
    if (rd8(mpf + 11) != 0)
        return fail("default configuration instead of a table");
    uint64_t table = rd32(mpf + 4);
    if (table < 0x1000 || table + MP_HEADER_BYTES > LOW_MEMORY_END)
        return fail("configuration table pointer outside low memory");
    uint32_t length = rd16(table + 4);
    if (rd32(table) != 0x504d4350 /* "PCMP" */)
        return fail("configuration table without the PCMP signature");
    if (length < MP_HEADER_BYTES || table + length > LOW_MEMORY_END)
        return fail("configuration table length out of range");
    if (byte_sum(table, length) != 0)
        return fail("configuration table checksum");
    uint32_t entries = rd16(table + 34);
    put_str("MP table at=");
    put_hex(table);
    put_field("length", length);
    put_field("revision", rd8(table + 6));
    put_field("entries", entries);
    put_str(" lapic=");
    put_hex(rd32(table + 36));
    put_char('\n');

    uint64_t p = table + MP_HEADER_BYTES, end = table + length;
    uint32_t io_interrupts = 0, identity = 0;
    for (uint32_t i = 0; i < entries; i++) {
        if (p >= end)
            return fail("entry count runs past the table length");
        uint8_t type = rd8(p);
        uint64_t size = type == 0 ? 20 : 8;
        if (type > 4)
            return fail("unknown entry type");
        if (p + size > end)
            return fail("entry runs past the table length");
        if (type == 0) {
            uint8_t flags = rd8(p + 3);
            put_str("MP cpu");
            put_field("apic", rd8(p + 1));
            put_field("enabled", flags & 1);
            put_field("bsp", (flags >> 1) & 1);
            put_char('\n');
            if (n_cpus >= MAX_CPUS)
                return fail("more processor entries than the probe takes");
            if (flags & 2) {
                if (bsp_apic_id >= 0)
                    return fail("two boot processors");
                bsp_apic_id = rd8(p + 1);
            }
            cpu_apic_ids[n_cpus++] = rd8(p + 1);
        } else if (type == 1) {
            put_str("MP bus");
            put_field("id", rd8(p + 1));
            put_str(" type=");
            for (int k = 0; k < 6; k++)
                put_char((char)rd8(p + 2 + k));
            put_char('\n');
        } else if (type == 2) {
            put_str("MP ioapic");
            put_field("id", rd8(p + 1));
            put_field("version", rd8(p + 2));
            put_field("enabled", rd8(p + 3) & 1);
            put_str(" address=");
            put_hex(rd32(p + 4));
            put_char('\n');
        } else if (type == 3) {
            io_interrupts++;
            identity += rd8(p + 5) == rd8(p + 7) && rd8(p + 1) == 0;
        } else {
            put_str("MP lint");
            put_field("type", rd8(p + 1));
            put_field("apic", rd8(p + 6));
            put_field("lint", rd8(p + 7));
            put_char('\n');
        }
        p += size;
    }
    if (p != end)
        return fail("entries do not fill the table length");
    put_str("MP io-interrupts");
    put_field("count", io_interrupts);
    put_field("irq-to-same-pin", identity);
    put_char('\n');
    if (bsp_apic_id < 0)
        return fail("no boot processor entry");
    return 0;
}

static void lapic_write(uint32_t reg, uint32_t v) { mmio_write32(LAPIC_BASE + reg, v); }
static uint32_t lapic_read(uint32_t reg) { return mmio_read32(LAPIC_BASE + reg); }

static uint32_t ioapic_read(uint32_t reg)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, reg);
    return mmio_read32(IOAPIC_BASE + IOAPIC_WINDOW);
}

static void send_ipi(uint8_t apic_id, uint32_t command)
{
    lapic_write(LAPIC_ICR_HIGH, (uint32_t)apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, command);
    for (uint64_t i = 0; i < 1000000 && (lapic_read(LAPIC_ICR_LOW) & LAPIC_ICR_DELIVERY_PENDING); i++)
        __asm__ volatile("pause");
}

/* INIT-SIPI-SIPI to every listed CPU but this one; waits for them to count in. */
static int start_aps(const char *round)
{
    volatile uint8_t *seen = (volatile uint8_t *)AP_SEEN_GPA;
    volatile uint16_t *count = (volatile uint16_t *)AP_COUNT_GPA;
    for (int i = 0; i < AP_MAX_APIC_ID; i++)
        seen[i] = 0;
    *count = 0;
    memcpy((void *)AP_TRAMPOLINE_GPA, AP_TRAMPOLINE, sizeof(AP_TRAMPOLINE));
    barrier();
    uint32_t expected = 0;
    for (uint32_t i = 0; i < n_cpus; i++) {
        if (cpu_apic_ids[i] == bsp_apic_id)
            continue;
        expected++;
        send_ipi(cpu_apic_ids[i], LAPIC_ICR_INIT_ASSERT);
        send_ipi(cpu_apic_ids[i], LAPIC_ICR_STARTUP | (uint32_t)(AP_TRAMPOLINE_GPA >> 12));
        send_ipi(cpu_apic_ids[i], LAPIC_ICR_STARTUP | (uint32_t)(AP_TRAMPOLINE_GPA >> 12));
    }
    uint64_t wait_ns = cmdline_get_u64("wait_ms", 20000) * NS_PER_MS, t0 = clock_ns();
    for (uint64_t spins = 0; *count < expected && spins < PROBE_SPIN_LIMIT; spins++) {
        if (clock_ns() - t0 > wait_ns)
            break;
        __asm__ volatile("pause");
    }
    put_str("MP ");
    put_str(round);
    put_field("aps-expected", expected);
    put_field("aps-counted", *count);
    put_char('\n');
    for (int id = 0; id < AP_MAX_APIC_ID; id++) {
        if (seen[id]) {
            put_str("MP ap-up");
            put_field("apic", (uint64_t)id);
            put_char('\n');
        }
    }
    return *count == expected ? 0 : fail("not every AP started");
}

int probe_main(void)
{
    if (read_table())
        return 1;
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | LAPIC_SVR_ENABLE | 0xff);
    uint32_t own_id = lapic_read(LAPIC_ID) >> 24;
    uint32_t ioapic_version = ioapic_read(IOAPIC_REG_VERSION);
    put_str("MP this-cpu");
    put_field("lapic-id", own_id);
    put_char('\n');
    put_str("MP ioapic-registers");
    put_field("id", (ioapic_read(IOAPIC_REG_ID) >> 24) & 0xf);
    put_field("version", ioapic_version & 0xff);
    put_field("pins", ((ioapic_version >> 16) & 0xff) + 1);
    put_char('\n');
    if ((int)own_id != bsp_apic_id)
        return fail("the boot processor entry is not this CPU");
    if (start_aps("boot"))
        return 1;
    if (cmdline_get_u64("snap", 0)) {
        if (probe_snapshot_point("smp") < 0)
            return fail("no byte after the snapshot point");
        if (start_aps("again"))
            return 1;
    }
    put_line("PROBE smp OK");
    return 0;
}

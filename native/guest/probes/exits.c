/* exits probe: provokes one exit the core must end the VM on, chosen by mode=:
 *   io      out to port 0x1234 (nobody owns it)            -> unhandled_io (strict mode)
 *   mmio    read from 0xe0000000 (nothing mapped)          -> unhandled_mmio (strict mode)
 *   triple  int3 with an empty IDT                          -> triple_fault
 *   xrstor  enable XSAVE and run xrstor: at hardware speed it runs and the probe reports
 *           "xrstor ok"; on an instruction-emulating KVM it is an emulation failure. */
#include "probe.h"

#define UNOWNED_PORT 0x1234
#define UNMAPPED_MMIO_GPA 0xe0000000ull
#define CR4_OSXSAVE (1ull << 18)
#define CR4_OSFXSR (1ull << 9)
#define XCR0_X87_SSE 0x3

static uint8_t xsave_area[4096] __attribute__((aligned(64)));

int probe_main(void)
{
    char mode[16];
    if (!cmdline_get("mode", mode, sizeof(mode))) {
        put_line("PROBE exits FAIL no mode=");
        return 1;
    }
    put_str("exits mode ");
    put_line(mode);
    if (!memcmp(mode, "io", 3)) {
        outb(UNOWNED_PORT, 0x55);
    } else if (!memcmp(mode, "mmio", 5)) {
        (void)mmio_read32(UNMAPPED_MMIO_GPA);
    } else if (!memcmp(mode, "triple", 7)) {
        struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = {0, 0};
        __asm__ volatile("lidt %0; int3" ::"m"(idtr));
    } else if (!memcmp(mode, "xrstor", 7)) {
        uint64_t cr4;
        __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
        cr4 |= CR4_OSXSAVE | CR4_OSFXSR;
        __asm__ volatile("mov %0, %%cr4" ::"r"(cr4));
        __asm__ volatile("xsetbv" ::"c"(0), "a"(XCR0_X87_SSE), "d"(0));
        memset(xsave_area, 0, sizeof(xsave_area));
        __asm__ volatile("xrstor %0" ::"m"(*(uint8_t(*)[4096])xsave_area), "a"(XCR0_X87_SSE), "d"(0));
        put_line("xrstor ok");
        put_line("PROBE exits OK");
        return 0;
    }
    put_line("PROBE exits FAIL the exit did not end the VM");
    return 1;
}

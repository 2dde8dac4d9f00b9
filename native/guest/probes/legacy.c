/* legacy probe: the CMOS RTC (0x70/0x71) and the i8042 (0x60/0x64) the way Linux's rtc_cmos,
 * i8042, atkbd and psmouse drivers use them. Prints the RTC's time ("rtc: YYYY-MM-DD hh:mm:ss",
 * the host compares it with its own clock), sets it and reads it back, checks every controller
 * and keyboard answer and the empty mouse port, waits for IRQ 1 and IRQ 12, then resets the
 * machine: `reset=cmd` (default) with
 * command 0xFE, `reset=outport` by writing the output port with the reset bit low. */
#include "probe.h"
#include "probe_irq.h"

#define CMOS_INDEX 0x70
#define CMOS_DATA 0x71
#define CMOS_NMI_DISABLE 0x80
#define RTC_SECONDS 0x00
#define RTC_MINUTES 0x02
#define RTC_HOURS 0x04
#define RTC_DAY 0x07
#define RTC_MONTH 0x08
#define RTC_YEAR 0x09
#define RTC_REG_A 0x0a
#define RTC_REG_B 0x0b
#define RTC_REG_C 0x0c
#define RTC_REG_D 0x0d
#define RTC_CENTURY 0x32
#define RTC_UIP 0x80
#define RTC_SET 0x80
#define RTC_24H 0x02
#define RTC_BINARY 0x04
#define RTC_VALID 0x80
#define CMOS_RAM_FIRST 0x0e
#define CMOS_RAM_LAST 0x7f
#define UIP_READS 1000

#define I8042_DATA 0x60
#define I8042_CMD 0x64
#define STR_OBF 0x01
#define STR_AUXDATA 0x20
#define STR_TIMEOUT 0x40
#define CTR_KBDINT 0x01
#define CTR_AUXINT 0x02
#define CTR_KBDDIS 0x10
#define CTR_AUXDIS 0x20
#define KEYBOARD_IRQ 1
#define MOUSE_IRQ 12
#define OBF_POLLS 100000

static int failures;

static void fail(const char *what, uint64_t got)
{
    put_str("FAIL ");
    put_str(what);
    put_str(": got 0x");
    put_hex(got);
    put_line("");
    failures++;
}

static void expect(const char *what, uint64_t got, uint64_t want)
{
    if (got != want)
        fail(what, got);
}

/* ---- CMOS RTC ---------------------------------------------------------------------------- */

static uint8_t cmos_read(uint8_t index) { outb(CMOS_INDEX, index); return inb(CMOS_DATA); }
static void cmos_write(uint8_t index, uint8_t v) { outb(CMOS_INDEX, index); outb(CMOS_DATA, v); }
static unsigned bcd(uint8_t v) { return (v >> 4) * 10 + (v & 0xf); }

static void put2(unsigned v) { put_char((char)('0' + v / 10 % 10)); put_char((char)('0' + v % 10)); }

static void put_rtc_time(const char *label)
{
    put_str(label);
    put2(bcd(cmos_read(RTC_CENTURY)));
    put2(bcd(cmos_read(RTC_YEAR)));
    put_char('-');
    put2(bcd(cmos_read(RTC_MONTH)));
    put_char('-');
    put2(bcd(cmos_read(RTC_DAY)));
    put_char(' ');
    put2(bcd(cmos_read(RTC_HOURS)));
    put_char(':');
    put2(bcd(cmos_read(RTC_MINUTES)));
    put_char(':');
    put2(bcd(cmos_read(RTC_SECONDS)));
    put_line("");
}

static void check_rtc(void)
{
    expect("rtc register D (valid, NMI bit set in the index)", cmos_read(CMOS_NMI_DISABLE | RTC_REG_D), RTC_VALID);
    for (int i = 0; i < UIP_READS; i++)
        if (cmos_read(RTC_REG_A) & RTC_UIP) {
            fail("rtc update in progress", cmos_read(RTC_REG_A));
            break;
        }
    expect("rtc register B (24-hour BCD)", cmos_read(RTC_REG_B), RTC_24H);
    expect("rtc register C (no interrupt flags)", cmos_read(RTC_REG_C), 0);
    put_rtc_time("rtc: ");

    /* binary mode: the same clock, not in BCD */
    unsigned year = bcd(cmos_read(RTC_YEAR));
    cmos_write(RTC_REG_B, RTC_24H | RTC_BINARY);
    expect("rtc year in binary mode", cmos_read(RTC_YEAR), year);
    /* 12-hour mode: hour 1-12, bit 7 for PM */
    cmos_write(RTC_REG_B, RTC_BINARY);
    unsigned h12 = cmos_read(RTC_HOURS);
    cmos_write(RTC_REG_B, RTC_24H | RTC_BINARY);
    unsigned h24 = cmos_read(RTC_HOURS);
    unsigned back = (h12 & 0x7f) % 12 + ((h12 & 0x80) ? 12 : 0);
    if (h24 != back && (h24 + 23) % 24 != back)  /* the hour may have turned in between */
        fail("rtc 12-hour mode", h12);
    cmos_write(RTC_REG_B, RTC_24H);

    /* set the clock the way Linux's mc146818_set_time does: SET held while writing */
    cmos_write(RTC_REG_B, RTC_24H | RTC_SET);
    cmos_write(RTC_SECONDS, 0x50);
    cmos_write(RTC_MINUTES, 0x59);
    cmos_write(RTC_HOURS, 0x23);
    cmos_write(RTC_DAY, 0x31);
    cmos_write(RTC_MONTH, 0x12);
    cmos_write(RTC_YEAR, 0x31);
    cmos_write(RTC_CENTURY, 0x20);
    expect("rtc seconds while SET holds the clock", cmos_read(RTC_SECONDS), 0x50);
    cmos_write(RTC_REG_B, RTC_24H);
    put_rtc_time("rtc after set: ");
    /* a date no clock shows is refused: the clock keeps its time */
    cmos_write(RTC_REG_B, RTC_24H | RTC_SET);
    cmos_write(RTC_MONTH, 0x13);
    cmos_write(RTC_REG_B, RTC_24H);
    expect("rtc month after an impossible set", cmos_read(RTC_MONTH), 0x12);

    for (unsigned i = CMOS_RAM_FIRST; i <= CMOS_RAM_LAST; i++)
        if (i != RTC_CENTURY)
            cmos_write((uint8_t)i, (uint8_t)(i ^ 0x5a));
    for (unsigned i = CMOS_RAM_FIRST; i <= CMOS_RAM_LAST; i++)
        if (i != RTC_CENTURY && cmos_read((uint8_t)i) != (uint8_t)(i ^ 0x5a)) {
            fail("cmos ram byte", i);
            break;
        }
}

/* ---- i8042 ------------------------------------------------------------------------------- */

static int wait_obf(uint8_t *status)
{
    for (int i = 0; i < OBF_POLLS; i++) {
        uint8_t s = inb(I8042_CMD);
        if (s & STR_OBF) {
            *status = s;
            return 1;
        }
    }
    return 0;
}

/* The next byte of the output buffer, checking whether it says it comes from the mouse. */
static uint8_t read_answer(const char *what, int from_mouse)
{
    uint8_t status = 0;
    if (!wait_obf(&status)) {
        fail(what, 0x100);   /* 0x100: no byte came */
        return 0;
    }
    if (!!(status & STR_AUXDATA) != from_mouse)
        fail("i8042 AUXDATA status bit", status);
    return inb(I8042_DATA);
}

static void command(uint8_t cmd) { outb(I8042_CMD, cmd); }
static void command_with(uint8_t cmd, uint8_t data) { outb(I8042_CMD, cmd); outb(I8042_DATA, data); }

static uint8_t read_ctr(void)
{
    command(0x20);
    return read_answer("i8042 read CTR", 0);
}

static void expect_bytes(const char *what, const uint8_t *want, int n, int from_mouse)
{
    for (int i = 0; i < n; i++)
        expect(what, read_answer(what, from_mouse), want[i]);
}

static void check_i8042(void)
{
    expect("i8042 output buffer at power on", inb(I8042_CMD) & STR_OBF, 0);
    command(0xaa);
    expect("i8042 self test", read_answer("i8042 self test", 0), 0x55);
    uint8_t ctr = read_ctr();
    command_with(0x60, ctr & (uint8_t)~(CTR_KBDINT | CTR_AUXINT));
    expect("i8042 CTR written", read_ctr(), ctr & (uint8_t)~(CTR_KBDINT | CTR_AUXINT));
    command(0xab);
    expect("i8042 keyboard port test", read_answer("i8042 keyboard port test", 0), 0);
    command(0xa9);
    expect("i8042 aux port test", read_answer("i8042 aux port test", 0), 0);
    command(0xa7);
    expect("i8042 aux disabled", read_ctr() & CTR_AUXDIS, CTR_AUXDIS);
    command(0xa8);
    expect("i8042 aux enabled", read_ctr() & CTR_AUXDIS, 0);
    command(0xad);
    expect("i8042 keyboard disabled", read_ctr() & CTR_KBDDIS, CTR_KBDDIS);
    command(0xae);
    expect("i8042 keyboard enabled", read_ctr() & CTR_KBDDIS, 0);
    command_with(0xd3, 0x5a);
    expect("i8042 aux loop", read_answer("i8042 aux loop", 1), 0x5a);
    command_with(0xd2, 0x77);
    expect("i8042 keyboard loop", read_answer("i8042 keyboard loop", 0), 0x77);
    command(0xd0);
    expect("i8042 output port reset bit", read_answer("i8042 output port", 0) & 1, 1);
    expect("i8042 output buffer empty again", inb(I8042_CMD) & STR_OBF, 0);

    const uint8_t kbd_id[] = {0xfa, 0xab, 0x83}, kbd_reset[] = {0xfa, 0xaa};
    outb(I8042_DATA, 0xf2);
    expect_bytes("keyboard identify", kbd_id, 3, 0);
    outb(I8042_DATA, 0xff);
    expect_bytes("keyboard reset", kbd_reset, 2, 0);
    const uint8_t set_query[] = {0xfa, 0xfa, 0x02};
    outb(I8042_DATA, 0xf0);
    outb(I8042_DATA, 0x00);
    expect_bytes("keyboard scancode set", set_query, 3, 0);
    /* no mouse: a byte for the mouse port times out (0xFE with the TIMEOUT status bit) */
    command_with(0xd4, 0xf2);
    uint8_t status = 0;
    if (!wait_obf(&status))
        fail("mouse port answer", 0x100);
    expect("mouse port status", status & (STR_AUXDATA | STR_TIMEOUT), STR_AUXDATA | STR_TIMEOUT);
    expect("mouse port byte", inb(I8042_DATA), 0xfe);

    /* interrupts: IRQ 1 for a keyboard byte, IRQ 12 for a mouse byte, as the CTR enables */
    if (probe_irq_enable(KEYBOARD_IRQ) < 0) {
        fail("probe_irq_enable", KEYBOARD_IRQ);
        return;
    }
    command_with(0x60, CTR_KBDINT);
    command_with(0xd2, 0x11);
    probe_irq_wait();                     /* halts for good if IRQ 1 never comes */
    expect("byte behind IRQ 1", read_answer("byte behind IRQ 1", 0), 0x11);
    put_line("irq 1 arrived");
    if (probe_irq_enable(MOUSE_IRQ) < 0) {
        fail("probe_irq_enable", MOUSE_IRQ);
        return;
    }
    command_with(0x60, CTR_AUXINT);
    command_with(0xd3, 0x22);
    probe_irq_wait();
    expect("byte behind IRQ 12", read_answer("byte behind IRQ 12", 1), 0x22);
    put_line("irq 12 arrived");
}

int probe_main(void)
{
    put_line("legacy probe");
    check_rtc();
    check_i8042();
    if (failures) {
        put_line("PROBE legacy FAIL");
        halt_forever();
    }
    put_line("PROBE legacy OK");
    char how[16];
    if (cmdline_get("reset", how, sizeof(how)) && !memcmp(how, "outport", 8)) {
        command_with(0xd1, 0x02);        /* output port with bit 0 (reset) low */
        put_line("PROBE legacy FAIL output port reset did not end the VM");
        halt_forever();
    }
    guest_reset();                       /* command 0xFE */
}

/* probe_irq.c — see probe_irq.h. The 8259 programming is Linux's init_8259A(); the native
 * core's in-kernel irqchip routes the PIC through LINT0 (ExtINT). */
#include "probe.h"
#include "probe_irq.h"

#define PIC_MASTER_COMMAND 0x20
#define PIC_MASTER_DATA 0x21
#define PIC_SLAVE_COMMAND 0xa0
#define PIC_SLAVE_DATA 0xa1
#define PIC_ICW1_INIT_WITH_ICW4 0x11   /* edge triggered, cascaded */
#define PIC_ICW4_8086_MODE 0x01
#define PIC_CASCADE_LINE 2
#define PIC_EOI 0x20
#define PIC_LINES_PER_CHIP 8
#define PIC_MASTER_VECTOR 0x20          /* first vector after the 32 exceptions */
#define PIC_SLAVE_VECTOR (PIC_MASTER_VECTOR + PIC_LINES_PER_CHIP)
#define IDT_ENTRIES (PIC_MASTER_VECTOR + PROBE_PIC_LINES)
#define IDT_INTERRUPT_GATE_PRESENT 0x8e /* present, ring 0, 64-bit interrupt gate */

struct __attribute__((packed)) idt_gate {
    uint16_t offset_low;
    uint16_t selector;
    uint8_t ist;
    uint8_t type_attr;
    uint16_t offset_mid;
    uint32_t offset_high;
    uint32_t reserved;
};

struct __attribute__((packed)) idt_pointer {
    uint16_t limit;
    uint64_t base;
};

struct interrupt_frame;

static struct idt_gate idt[IDT_ENTRIES] __attribute__((aligned(16)));
static int idt_loaded;

/* The waiting loop does the work; a handler only ends the interrupt. */
__attribute__((interrupt)) static void master_line_handler(struct interrupt_frame *frame)
{
    (void)frame;
    outb(PIC_MASTER_COMMAND, PIC_EOI);
}

__attribute__((interrupt)) static void slave_line_handler(struct interrupt_frame *frame)
{
    (void)frame;
    outb(PIC_SLAVE_COMMAND, PIC_EOI);
    outb(PIC_MASTER_COMMAND, PIC_EOI);
}

static void set_gate(uint32_t vector, void (*handler)(struct interrupt_frame *), uint16_t cs)
{
    uint64_t at = (uint64_t)handler;
    idt[vector].offset_low = (uint16_t)at;
    idt[vector].selector = cs;
    idt[vector].type_attr = IDT_INTERRUPT_GATE_PRESENT;
    idt[vector].offset_mid = (uint16_t)(at >> 16);
    idt[vector].offset_high = (uint32_t)(at >> 32);
}

/* Every PIC vector gets a gate (a spurious IRQ 7/15 must not fault); the exception vectors
 * stay absent, so a fault still ends the VM as it does without an IDT. */
static void load_idt(void)
{
    uint16_t cs;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs));
    for (uint32_t line = 0; line < PROBE_PIC_LINES; line++)
        set_gate(PIC_MASTER_VECTOR + line,
                 line < PIC_LINES_PER_CHIP ? master_line_handler : slave_line_handler, cs);
    struct idt_pointer ptr = { sizeof(idt) - 1, (uint64_t)idt };
    __asm__ volatile("lidt %0" : : "m"(ptr));
    outb(PIC_MASTER_COMMAND, PIC_ICW1_INIT_WITH_ICW4);
    outb(PIC_SLAVE_COMMAND, PIC_ICW1_INIT_WITH_ICW4);
    outb(PIC_MASTER_DATA, PIC_MASTER_VECTOR);
    outb(PIC_SLAVE_DATA, PIC_SLAVE_VECTOR);
    outb(PIC_MASTER_DATA, 1u << PIC_CASCADE_LINE);
    outb(PIC_SLAVE_DATA, PIC_CASCADE_LINE);
    outb(PIC_MASTER_DATA, PIC_ICW4_8086_MODE);
    outb(PIC_SLAVE_DATA, PIC_ICW4_8086_MODE);
    outb(PIC_MASTER_DATA, 0xff);
    outb(PIC_SLAVE_DATA, 0xff);
    idt_loaded = 1;
}

int probe_irq_enable(uint32_t irq)
{
    if (irq == 0 || irq == PIC_CASCADE_LINE || irq >= PROBE_PIC_LINES)
        return -1;
    if (!idt_loaded)
        load_idt();
    if (irq < PIC_LINES_PER_CHIP) {
        outb(PIC_MASTER_DATA, inb(PIC_MASTER_DATA) & (uint8_t)~(1u << irq));
    } else {
        outb(PIC_SLAVE_DATA, inb(PIC_SLAVE_DATA) & (uint8_t)~(1u << (irq - PIC_LINES_PER_CHIP)));
        outb(PIC_MASTER_DATA, inb(PIC_MASTER_DATA) & (uint8_t)~(1u << PIC_CASCADE_LINE));
    }
    return 0;
}

void probe_irq_wait(void)
{
    __asm__ volatile("sti; hlt; cli" ::: "memory");
}

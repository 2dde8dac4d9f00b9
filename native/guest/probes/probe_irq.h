/* probe_irq.h — device interrupts for probes that idle: the legacy PIC pair remapped above
 * the exception vectors, one line unmasked, and an IDT whose PIC vectors only acknowledge.
 * A probe checks for work with interrupts off, then halts in probe_irq_wait() until the
 * line fires: no spinning (which costs a host CPU per idle VM). */
#ifndef SM_PROBE_IRQ_H
#define SM_PROBE_IRQ_H

#include <stdint.h>

#define PROBE_PIC_LINES 16

/* Routes legacy interrupt line `irq` (1 … 15: the native core's virtio-mmio lines) to an
 * acknowledging handler. 0 on success, -1 for a line the PIC does not have. */
int probe_irq_enable(uint32_t irq);

/* Halts until an interrupt arrives; interrupts stay off outside the halt, so one that came
 * after the caller last looked for work is taken at once (`sti; hlt` is atomic). */
void probe_irq_wait(void);

#endif

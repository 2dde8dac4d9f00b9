/* idle probe: reports once, then halts with interrupts off until the host stops the VM.
 * Used by benchmarks/bench_native.py for the idle host RSS of a VM (native vs QEMU). */
#include "probe.h"

int probe_main(void)
{
    put_line("PROBE idle READY");
    halt_forever();
}

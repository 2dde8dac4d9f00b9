/* probe_clock.h — time for probes: KVM's paravirtual clock (kvmclock), read the way Linux's
 * kvm-clock reads it. */
#ifndef SM_PROBE_CLOCK_H
#define SM_PROBE_CLOCK_H

#include <stdint.h>

#define NS_PER_SECOND 1000000000ull
#define NS_PER_MS 1000000ull

/* Nanoseconds since the VM started (a restored VM continues its snapshot's count); always 0
 * under a hypervisor without kvmclock. */
uint64_t clock_ns(void);

#endif

/* calib_loop.h — the fixed integer loop timed in the guest (calib probe) and on the host
 * (sm_calib_loop) to tell hardware-speed KVM from emulation. Pure integer code, no calls. */
#ifndef SM_CALIB_LOOP_H
#define SM_CALIB_LOOP_H

#include <stdint.h>

static inline uint64_t sm_calib_loop_body(uint64_t iterations)
{
    uint64_t x = 0x9e3779b97f4a7c15ULL, sum = 0;
    for (uint64_t i = 0; i < iterations; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        sum += x ^ i;
        __asm__ volatile("" : "+r"(sum)); /* keep the loop: same work in both builds */
    }
    return sum;
}

static inline uint64_t sm_calib_rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("lfence; rdtsc" : "=a"(lo), "=d"(hi)::"memory");
    return ((uint64_t)hi << 32) | lo;
}

/* Runs the loop and returns the TSC cycles it took; *checksum gets the loop's result. */
static inline uint64_t sm_calib_timed(uint64_t iterations, uint64_t *checksum)
{
    uint64_t t0 = sm_calib_rdtsc();
    *checksum = sm_calib_loop_body(iterations);
    return sm_calib_rdtsc() - t0;
}

#endif

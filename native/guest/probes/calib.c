/* calib probe: runs the shared integer loop (calib_loop.h) `rounds` times, `gap_ms` apart
 * (kvmclock), and reports each round's TSC cycles, their minimum and the loop's checksum. The
 * host times the same loop natively (sm_calib_loop) the same way. The minimum of spread-out
 * rounds, not one run: under QEMU TCG (which runs the nested-KVM tier) the first run, and now
 * and then a stretch of runs, is 3-4x slower than the best; an interrupt or a descheduled
 * vCPU only ever adds cycles. */
#include "probe.h"
#include "probe_clock.h"
#include "calib_loop.h"

#define CALIB_MAX_ROUNDS 64

int probe_main(void)
{
    uint64_t iterations = cmdline_get_u64("iterations", 12500);
    uint64_t rounds = cmdline_get_u64("rounds", 8);
    if (rounds < 1)
        rounds = 1;
    if (rounds > CALIB_MAX_ROUNDS)
        rounds = CALIB_MAX_ROUNDS;
    uint64_t gap_ns = cmdline_get_u64("gap_ms", 2) * NS_PER_MS;
    put_line("CALIB start");
    uint64_t sum = 0, fastest = ~0ull;
    for (uint64_t r = 0; r < rounds; r++) {
        uint64_t cycles = sm_calib_timed(iterations, &sum);
        put_str("CALIB round=");
        put_dec(r);
        put_str(" cycles=");
        put_dec(cycles);
        put_char('\n');
        if (cycles < fastest)
            fastest = cycles;
        for (uint64_t t0 = clock_ns(), spins = 0; clock_ns() - t0 < gap_ns && spins < PROBE_SPIN_LIMIT; spins++)
            __asm__ volatile("pause");
    }
    put_str("CALIB done iterations=");
    put_dec(iterations);
    put_str(" rounds=");
    put_dec(rounds);
    put_str(" cycles=");
    put_dec(fastest);
    put_str(" checksum=");
    put_hex(sum);
    put_char('\n');
    put_line("PROBE calib OK");
    return 0;
}

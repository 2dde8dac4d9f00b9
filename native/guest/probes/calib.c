/* calib probe: runs the shared integer loop (calib_loop.h) and reports its checksum. The
 * host times it against the same loop run natively (sm_calib_loop). */
#include "probe.h"
#include "calib_loop.h"

int probe_main(void)
{
    uint64_t iterations = cmdline_get_u64("iterations", 100000);
    put_line("CALIB start");
    uint64_t sum;
    uint64_t cycles = sm_calib_timed(iterations, &sum);
    put_str("CALIB done iterations=");
    put_dec(iterations);
    put_str(" cycles=");
    put_dec(cycles);
    put_str(" checksum=");
    put_hex(sum);
    put_char('\n');
    put_line("PROBE calib OK");
    return 0;
}

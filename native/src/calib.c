/* calib.c — sm_calib_loop (vCPU speed calibration): the calib probe's integer loop, run and
 * timed on the host. The loop is written once, in guest/probes/calib_loop.h, and compiled
 * into both the probe and this file, so guest and host provably run the same code. This is
 * the only core file that includes a guest header (tests/native/test_c_layering.py). */
#include "../include/supermachine.h"
#include "../guest/probes/calib_loop.h"

uint64_t sm_calib_loop(uint64_t iterations, uint64_t *checksum)
{
    uint64_t sum = 0;
    uint64_t cycles = sm_calib_timed(iterations, &sum);
    if (checksum)
        *checksum = sum;
    return cycles;
}

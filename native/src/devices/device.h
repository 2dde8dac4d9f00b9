/* device.h — all a device gets from the machine it sits in, handed to it when it is created:
 *  - an interrupt line (sm_irq_line): a function pointer, its context and the GSI;
 *  - guest memory (../memory.h: bounds-checked GPA ranges), for devices that touch RAM;
 *  - a reporter (sm_device_reporter) for the two things the machine must hear about.
 * Never the VM itself: no device includes sm_internal.h or calls into vm.c
 * (tests/native/test_c_layering.py checks it). vm.c fills these in (device_irq_line and
 * device_reporter there). */
#ifndef SM_DEVICES_DEVICE_H
#define SM_DEVICES_DEVICE_H

#include <stdint.h>

/* An edge-triggered interrupt: pulse(ctx, gsi) raises and lowers GSI gsi. */
typedef struct sm_irq_line {
    void (*pulse)(void *ctx, uint32_t gsi);
    void *ctx;
    uint32_t gsi;
} sm_irq_line;

static inline void sm_irq_line_pulse(const sm_irq_line *line)
{
    if (line->pulse)
        line->pulse(line->ctx, line->gsi);
}

/* What a device may tell the machine; either callback may be NULL (nobody listens). */
typedef struct sm_device_reporter {
    /* The device is broken (first reason only) and stops processing: `device` is its name,
     * `reason` the named error. The machine notes it on the console; the VM keeps running. */
    void (*broken)(void *ctx, const char *device, const char *reason);
    /* The guest asked for a machine reset: the VM ends cleanly (a guest "reboot"); `why`
     * says through which device. */
    void (*reset)(void *ctx, const char *why);
    void *ctx;
} sm_device_reporter;

static inline void sm_device_report_broken(const sm_device_reporter *r, const char *device,
                                           const char *reason)
{
    if (r->broken)
        r->broken(r->ctx, device, reason);
}

static inline void sm_device_report_reset(const sm_device_reporter *r, const char *why)
{
    if (r->reset)
        r->reset(r->ctx, why);
}

#endif

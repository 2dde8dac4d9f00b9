/* cmos_rtc.h — the PC's CMOS RTC (MC146818) at ports 0x70 (index) and 0x71 (data): the time
 * of the host clock in BCD, registers A-D, and 128 bytes of CMOS RAM. Linux's rtc_cmos finds
 * it at once (without it, its probe spends ~5 s before "broken or not accessible"). */
#ifndef SM_CMOS_RTC_H
#define SM_CMOS_RTC_H

#include <pthread.h>
#include <stdint.h>
#include "device.h"

#define SM_CMOS_INDEX_PORT 0x70
#define SM_CMOS_DATA_PORT 0x71
#define SM_CMOS_BYTES 128
#define SM_CMOS_RTC_IRQ 8   /* never raised, but Linux's rtc_cmos claims it (not shared) */

/* Register indexes (the MC146818 map; 0x32 is the century byte PCs keep in CMOS RAM). */
enum {
    SM_CMOS_SECONDS = 0x00, SM_CMOS_SECONDS_ALARM = 0x01, SM_CMOS_MINUTES = 0x02,
    SM_CMOS_MINUTES_ALARM = 0x03, SM_CMOS_HOURS = 0x04, SM_CMOS_HOURS_ALARM = 0x05,
    SM_CMOS_DAY_OF_WEEK = 0x06, SM_CMOS_DAY_OF_MONTH = 0x07, SM_CMOS_MONTH = 0x08,
    SM_CMOS_YEAR = 0x09, SM_CMOS_REG_A = 0x0a, SM_CMOS_REG_B = 0x0b, SM_CMOS_REG_C = 0x0c,
    SM_CMOS_REG_D = 0x0d, SM_CMOS_CENTURY = 0x32
};

#define SM_CMOS_REG_A_UIP 0x80        /* update in progress: never set here */
#define SM_CMOS_REG_B_SET 0x80        /* the guest is setting the time: the clock is held */
#define SM_CMOS_REG_B_24H 0x02
#define SM_CMOS_REG_B_BINARY 0x04     /* else BCD */
#define SM_CMOS_REG_D_VALID 0x80      /* valid RAM and time (battery good) */
#define SM_CMOS_HOUR_PM 0x80          /* 12-hour mode */

typedef struct sm_cmos_counters {
    uint64_t reads;           /* data port reads */
    uint64_t writes;          /* data port writes */
    uint64_t time_reads;      /* reads of a time or date register */
    uint64_t time_sets;       /* times the guest set the clock */
} sm_cmos_counters;

typedef struct sm_cmos_rtc {
    pthread_mutex_t lock;
    uint8_t index;                    /* last index written to 0x70, NMI bit dropped */
    uint8_t ram[SM_CMOS_BYTES];       /* registers A, B, alarms and CMOS RAM bytes */
    int64_t offset_s;                 /* guest clock - host clock, from the guest's sets */
    uint8_t held[SM_CMOS_BYTES];      /* the time registers while SET holds the clock */
    sm_cmos_counters counters;
} sm_cmos_rtc;

/* Starts in 24-hour BCD mode with the host's UTC time. No interrupts: the update, alarm and
 * periodic flags in register C never rise (and Linux asks for none to boot). */
void sm_cmos_rtc_init(sm_cmos_rtc *r);
void sm_cmos_rtc_destroy(sm_cmos_rtc *r);
/* One byte of port I/O on 0x70 or 0x71. */
void sm_cmos_rtc_pio(sm_cmos_rtc *r, uint16_t port, uint8_t *data, int is_write);

#endif

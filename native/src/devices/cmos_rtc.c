/* cmos_rtc.c — MC146818 CMOS RTC: the host's UTC clock (plus whatever offset the guest set)
 * read out in the format register B asks for, and the rest of the 128 bytes as plain RAM. */
#define _GNU_SOURCE
#include "cmos_rtc.h"

#include <string.h>
#include <time.h>

#define CMOS_INDEX_MASK 0x7f          /* bit 7 of the index port disables NMIs: ignored */
#define CMOS_REG_A_POWER_ON 0x26      /* 32.768 kHz time base, 1024 Hz periodic rate */
#define CMOS_UNREADABLE_PORT 0xff     /* 0x70 is write-only */

static int is_time_register(uint8_t index)
{
    switch (index) {
    case SM_CMOS_SECONDS: case SM_CMOS_MINUTES: case SM_CMOS_HOURS: case SM_CMOS_DAY_OF_WEEK:
    case SM_CMOS_DAY_OF_MONTH: case SM_CMOS_MONTH: case SM_CMOS_YEAR: case SM_CMOS_CENTURY:
        return 1;
    default:
        return 0;
    }
}

static uint8_t encode(const sm_cmos_rtc *r, unsigned value)
{
    if (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_BINARY)
        return (uint8_t)value;
    return (uint8_t)(((value / 10) << 4) | (value % 10));
}

/* A register's value as a number; a BCD byte with a nibble above 9 gives >= 100, which
 * every caller's range check refuses. */
static unsigned decode(const sm_cmos_rtc *r, uint8_t byte)
{
    if (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_BINARY)
        return byte;
    unsigned high = byte >> 4, low = byte & 0xf;
    return low > 9 ? 100u + byte : high * 10 + low;
}

static uint8_t encode_hour(const sm_cmos_rtc *r, unsigned hour)
{
    if (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_24H)
        return encode(r, hour);
    unsigned twelve = hour % 12 ? hour % 12 : 12;
    return (uint8_t)(encode(r, twelve) | (hour >= 12 ? SM_CMOS_HOUR_PM : 0));
}

/* 0..23, or >= 24 for a value no clock shows. */
static unsigned decode_hour(const sm_cmos_rtc *r, uint8_t byte)
{
    if (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_24H)
        return decode(r, byte);
    unsigned twelve = decode(r, byte & (uint8_t)~SM_CMOS_HOUR_PM);
    if (twelve < 1 || twelve > 12)
        return 24;
    return twelve % 12 + ((byte & SM_CMOS_HOUR_PM) ? 12 : 0);
}

/* The guest's clock now, written into out[] at the time registers' indexes. */
static void read_clock(const sm_cmos_rtc *r, uint8_t *out)
{
    time_t now = time(NULL) + (time_t)r->offset_s;
    struct tm tm;
    if (!gmtime_r(&now, &tm))
        memset(&tm, 0, sizeof(tm));
    unsigned year = (unsigned)tm.tm_year + 1900;
    out[SM_CMOS_SECONDS] = encode(r, (unsigned)tm.tm_sec % 60);   /* no leap second 60 */
    out[SM_CMOS_MINUTES] = encode(r, (unsigned)tm.tm_min);
    out[SM_CMOS_HOURS] = encode_hour(r, (unsigned)tm.tm_hour);
    out[SM_CMOS_DAY_OF_WEEK] = encode(r, (unsigned)tm.tm_wday + 1);
    out[SM_CMOS_DAY_OF_MONTH] = encode(r, (unsigned)tm.tm_mday);
    out[SM_CMOS_MONTH] = encode(r, (unsigned)tm.tm_mon + 1);
    out[SM_CMOS_YEAR] = encode(r, year % 100);
    out[SM_CMOS_CENTURY] = encode(r, (year / 100) % 100);
}

/* Set the guest's clock from the held time registers; a date no clock shows is dropped. */
static void set_clock(sm_cmos_rtc *r, const uint8_t *held)
{
    unsigned sec = decode(r, held[SM_CMOS_SECONDS]), min = decode(r, held[SM_CMOS_MINUTES]);
    unsigned hour = decode_hour(r, held[SM_CMOS_HOURS]);
    unsigned mday = decode(r, held[SM_CMOS_DAY_OF_MONTH]), mon = decode(r, held[SM_CMOS_MONTH]);
    unsigned year = decode(r, held[SM_CMOS_YEAR]), century = decode(r, held[SM_CMOS_CENTURY]);
    if (sec > 59 || min > 59 || hour > 23 || mday < 1 || mday > 31 || mon < 1 || mon > 12 ||
        year > 99 || century > 99)
        return;
    struct tm tm;
    memset(&tm, 0, sizeof(tm));
    tm.tm_sec = (int)sec;
    tm.tm_min = (int)min;
    tm.tm_hour = (int)hour;
    tm.tm_mday = (int)mday;
    tm.tm_mon = (int)mon - 1;
    tm.tm_year = (int)(century * 100 + year) - 1900;
    time_t t = timegm(&tm);
    if (t == (time_t)-1)
        return;
    r->offset_s = (int64_t)t - (int64_t)time(NULL);
    r->counters.time_sets++;
}

void sm_cmos_rtc_init(sm_cmos_rtc *r)
{
    memset(r, 0, sizeof(*r));
    pthread_mutex_init(&r->lock, NULL);
    r->ram[SM_CMOS_REG_A] = CMOS_REG_A_POWER_ON;
    r->ram[SM_CMOS_REG_B] = SM_CMOS_REG_B_24H;
}

void sm_cmos_rtc_destroy(sm_cmos_rtc *r)
{
    pthread_mutex_destroy(&r->lock);
}

static uint8_t read_register(sm_cmos_rtc *r, uint8_t index)
{
    if (is_time_register(index)) {
        r->counters.time_reads++;
        if (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_SET)
            return r->held[index];
        uint8_t now[SM_CMOS_BYTES];
        read_clock(r, now);
        return now[index];
    }
    switch (index) {
    case SM_CMOS_REG_A:
        return r->ram[index] & (uint8_t)~SM_CMOS_REG_A_UIP;  /* never mid-update */
    case SM_CMOS_REG_C:
        return 0;                 /* no interrupt flags: none are raised */
    case SM_CMOS_REG_D:
        return SM_CMOS_REG_D_VALID;
    default:
        return r->ram[index];
    }
}

static void write_register(sm_cmos_rtc *r, uint8_t index, uint8_t v)
{
    int held = (r->ram[SM_CMOS_REG_B] & SM_CMOS_REG_B_SET) != 0;
    if (is_time_register(index)) {
        if (!held)
            read_clock(r, r->held);   /* one field changes: the others stay as they are now */
        r->held[index] = v;
        if (!held)
            set_clock(r, r->held);
        return;
    }
    switch (index) {
    case SM_CMOS_REG_A:
        r->ram[index] = v & (uint8_t)~SM_CMOS_REG_A_UIP;
        break;
    case SM_CMOS_REG_B:
        if ((v & SM_CMOS_REG_B_SET) && !held)
            read_clock(r, r->held);   /* the clock holds from here to the end of the set */
        r->ram[index] = v;
        if (!(v & SM_CMOS_REG_B_SET) && held)
            set_clock(r, r->held);
        break;
    case SM_CMOS_REG_C:
    case SM_CMOS_REG_D:
        break;                    /* read-only */
    default:
        r->ram[index] = v;
    }
}

void sm_cmos_rtc_pio(sm_cmos_rtc *r, uint16_t port, uint8_t *data, int is_write)
{
    pthread_mutex_lock(&r->lock);
    if (port == SM_CMOS_INDEX_PORT) {
        if (is_write)
            r->index = *data & CMOS_INDEX_MASK;
        else
            *data = CMOS_UNREADABLE_PORT;
    } else if (is_write) {
        r->counters.writes++;
        write_register(r, r->index, *data);
    } else {
        r->counters.reads++;
        *data = read_register(r, r->index);
    }
    pthread_mutex_unlock(&r->lock);
}

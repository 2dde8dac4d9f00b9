/* agent_shell.c — see agent_shell.h. */
#include "probe.h"
#include "probe_clock.h"
#include "agent_files.h"
#include "agent_shell.h"

#define SECONDS_PER_DAY 86400u
#define DAYS_FROM_0000_03_01_TO_EPOCH 719468u
#define DAYS_PER_400_YEARS 146097u
#define SOFTWARE_NAME "supermachine-probe-agent"
#define MIB_TO_4K_PAGES 256
#define LOW_RAM_END_MAX 0xc0000000ull /* the native core's 32-bit MMIO hole */

typedef int (*builtin_fn)(int argc, const char *const *argv, struct shell_output *o);

static uint64_t counter;          /* `count` */
static uint64_t clock_seconds;    /* `date -s @N`: the time the host set… */
static uint64_t clock_set_ns;     /* …at this clock_ns() */
static char word_buf[2 * SHELL_SCRIPT_MAX_BYTES];  /* every word takes >= 1 script byte */
static const char *words[SHELL_MAX_WORDS];

static int streq(const char *a, const char *b) { return strlen(a) == strlen(b) && memcmp(a, b, strlen(a)) == 0; }

/* ---- output ------------------------------------------------------------------------------ */

static void write_to(uint8_t *buf, uint32_t cap, uint32_t *len, int *overflowed, const void *p, uint32_t n)
{
    if (n > cap - *len) {
        n = cap - *len;
        *overflowed = 1;
    }
    memcpy(buf + *len, p, n);
    *len += n;
}

static void out_bytes(struct shell_output *o, const void *p, uint32_t n)
{
    write_to(o->out, SHELL_STDOUT_BYTES, &o->out_len, &o->overflowed, p, n);
}

static void out_str(struct shell_output *o, const char *s) { out_bytes(o, s, (uint32_t)strlen(s)); }

static void out_dec(struct shell_output *o, uint64_t v, int min_digits)
{
    char tmp[20];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v || n < min_digits);
    while (n) out_bytes(o, &tmp[--n], 1);
}

static void err_str(struct shell_output *o, const char *s)
{
    write_to(o->err, SHELL_STDERR_BYTES, &o->err_len, &o->overflowed, s, (uint32_t)strlen(s));
}

/* ---- built-ins --------------------------------------------------------------------------- */

static int run_echo(int argc, const char *const *argv, struct shell_output *o)
{
    int newline = !(argc > 1 && streq(argv[1], "-n"));
    for (int i = newline ? 1 : 2; i < argc; i++) {
        out_str(o, argv[i]);
        if (i + 1 < argc)
            out_str(o, " ");
    }
    if (newline)
        out_str(o, "\n");
    return 0;
}

static int run_true(int argc, const char *const *argv, struct shell_output *o) { (void)argc, (void)argv, (void)o; return 0; }
static int run_false(int argc, const char *const *argv, struct shell_output *o) { (void)argc, (void)argv, (void)o; return 1; }

static int run_uname(int argc, const char *const *argv, struct shell_output *o)
{
    (void)argc, (void)argv;
    out_str(o, SOFTWARE_NAME "\n");
    return 0;
}

static int run_count(int argc, const char *const *argv, struct shell_output *o)
{
    (void)argc, (void)argv;
    out_dec(o, ++counter, 1);
    out_str(o, "\n");
    return 0;
}

/* `touch MIB`: writes one word in each 4 KiB page of MIB fresh MiB of guest RAM, so they
 * become resident on the host: a working set like a booted kernel's, for memory benchmarks.
 * The pages stay taken (each call takes new ones). */
static int run_touch(int argc, const char *const *argv, struct shell_output *o)
{
    uint64_t mib = argc == 2 ? parse_u64(argv[1]) : 0;
    uint64_t pages = mib * MIB_TO_4K_PAGES;
    uint64_t ram_end = g_mem_bytes < LOW_RAM_END_MAX ? g_mem_bytes : LOW_RAM_END_MAX;
    if (!mib) {
        err_str(o, "touch: usage: touch MIB (a number of MiB greater than 0)\n");
        return 1;
    }
    if (probe_pages_left(ram_end) < pages) {
        err_str(o, "touch: that many MiB do not fit in the guest RAM left\n");
        return 1;
    }
    volatile uint64_t *region = alloc_pages_nozero(pages);
    uint64_t started = clock_ns();
    for (uint64_t page = 0; page < pages; page++)
        region[page * (PROBE_PAGE_BYTES / sizeof(uint64_t))] = page;
    out_str(o, "touched ");
    out_dec(o, pages, 1);
    out_str(o, " pages in ");
    out_dec(o, (clock_ns() - started) / NS_PER_MS, 1);
    out_str(o, " ms\n");
    return 0;
}

/* busybox's default format, "Thu Nov 27 09:05:03 UTC 2025"; the civil date from the day
 * count as in Howard Hinnant's civil_from_days. */
static void out_date(struct shell_output *o, uint64_t t)
{
    static const char *const WEEKDAYS[] = { "Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed" };
    static const char *const MONTHS[] = { "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug",
                                          "Sep", "Oct", "Nov", "Dec" };
    uint64_t days = t / SECONDS_PER_DAY, secs = t % SECONDS_PER_DAY;
    uint64_t z = days + DAYS_FROM_0000_03_01_TO_EPOCH;
    uint64_t era = z / DAYS_PER_400_YEARS, doe = z - era * DAYS_PER_400_YEARS;
    uint64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    uint64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    uint64_t mp = (5 * doy + 2) / 153, day = doy - (153 * mp + 2) / 5 + 1;
    uint64_t month = mp < 10 ? mp + 3 : mp - 9, year = yoe + era * 400 + (month <= 2);
    out_str(o, WEEKDAYS[days % 7]);
    out_str(o, " ");
    out_str(o, MONTHS[month - 1]);
    out_str(o, day < 10 ? "  " : " ");
    out_dec(o, day, 1);
    out_str(o, " ");
    out_dec(o, secs / 3600, 2);
    out_str(o, ":");
    out_dec(o, secs / 60 % 60, 2);
    out_str(o, ":");
    out_dec(o, secs % 60, 2);
    out_str(o, " UTC ");
    out_dec(o, year, 1);
    out_str(o, "\n");
}

static int run_date(int argc, const char *const *argv, struct shell_output *o)
{
    if (argc == 3 && streq(argv[1], "-s") && argv[2][0] == '@' && argv[2][1]) {
        const char *p = argv[2] + 1;
        while (*p >= '0' && *p <= '9')
            p++;
        if (*p) {
            err_str(o, "date: invalid date '");
            err_str(o, argv[2]);
            err_str(o, "'\n");
            return 1;
        }
        clock_seconds = parse_u64(argv[2] + 1);
        clock_set_ns = clock_ns();
    } else if (argc != 1) {
        err_str(o, "date: the probe agent knows `date` and `date -s @SECONDS`\n");
        return 1;
    }
    uint64_t now_ns = clock_ns();
    out_date(o, clock_seconds + (now_ns > clock_set_ns ? now_ns - clock_set_ns : 0) / NS_PER_SECOND);
    return 0;
}

static int run_hostname(int argc, const char *const *argv, struct shell_output *o)
{
    const uint8_t *name;
    uint32_t len;
    enum files_result r = argc > 1
        ? files_write(HOSTNAME_PATH, strlen(HOSTNAME_PATH), (const uint8_t *)argv[1], (uint32_t)strlen(argv[1]), 0)
        : files_read(HOSTNAME_PATH, strlen(HOSTNAME_PATH), &name, &len);
    if (r != FILES_OK) {
        err_str(o, "hostname: ");
        err_str(o, files_strerror(r));
        err_str(o, "\n");
        return 1;
    }
    if (argc == 1) {
        out_bytes(o, name, len && name[len - 1] == '\n' ? len - 1 : len);
        out_str(o, "\n");
    }
    return 0;
}

static int run_cat(int argc, const char *const *argv, struct shell_output *o)
{
    int status = 0;
    for (int i = 1; i < argc; i++) {
        const uint8_t *data;
        uint32_t len;
        enum files_result r = files_read(argv[i], (uint32_t)strlen(argv[i]), &data, &len);
        if (r == FILES_OK) {
            out_bytes(o, data, len);
            continue;
        }
        err_str(o, "cat: ");
        err_str(o, argv[i]);
        err_str(o, ": ");
        err_str(o, files_strerror(r));
        err_str(o, "\n");
        status = 1;
    }
    return status;
}

/* `reboot`: the guest ends the VM itself through the i8042 reset, as Linux's `reboot -f`
 * does with reboot=k; the host sees no POWEROFF first. */
static int run_reboot(int argc, const char *const *argv, struct shell_output *o)
{
    (void)argc, (void)argv, (void)o;
    guest_reset();
    return 1;
}

/* `triple`: a triple fault (int3 with an empty IDT), the way a crashing kernel ends. */
static int run_triple(int argc, const char *const *argv, struct shell_output *o)
{
    (void)argc, (void)argv, (void)o;
    struct __attribute__((packed)) { uint16_t limit; uint64_t base; } idtr = {0, 0};
    __asm__ volatile("cli; lidt %0; int3" ::"m"(idtr));
    return 1;
}

static const struct {
    const char *name;
    builtin_fn run;
} BUILTINS[] = {
    { "echo", run_echo },   { "true", run_true },         { "false", run_false },
    { "count", run_count }, { "date", run_date },         { "hostname", run_hostname },
    { "cat", run_cat },     { "uname", run_uname },           { "touch", run_touch },
    { "reboot", run_reboot }, { "triple", run_triple },
};

int shell_run_argv(int argc, const char *const *argv, struct shell_output *o)
{
    o->out_len = o->err_len = 0;
    o->overflowed = 0;
    const char *name = argv[0];
    for (const char *p = argv[0]; *p; p++)
        if (*p == '/')
            name = p + 1;
    for (unsigned i = 0; i < sizeof(BUILTINS) / sizeof(BUILTINS[0]); i++) {
        if (!streq(name, BUILTINS[i].name))
            continue;
        int status = BUILTINS[i].run(argc, argv, o);
        if (o->overflowed) {
            o->err_len = 0;
            err_str(o, "probe-agent: ");
            err_str(o, argv[0]);
            err_str(o, ": output cut at the probe's limit\n");
            status = 1;
        }
        return status;
    }
    err_str(o, "probe-agent: ");
    err_str(o, argv[0]);
    err_str(o, ": not a built-in command\n");
    return SHELL_NOT_FOUND_STATUS;
}

/* ---- scripts ----------------------------------------------------------------------------- */

static int is_blank(const char *s, uint32_t i, uint32_t len)
{
    return s[i] == ' ' || s[i] == '\t' || (s[i] == '\\' && i + 1 < len && s[i + 1] == '\n');
}

static int ends_word(char c) { return c == ' ' || c == '\t' || c == '\n' || c == ';'; }

static int syntax_error(const char *what, uint32_t len, uint32_t *pos, struct shell_output *o)
{
    err_str(o, "probe-agent: syntax error: ");
    err_str(o, what);
    err_str(o, "\n");
    *pos = len;
    return -1;
}

/* The words of the command at script[*pos..len) into words[]; *pos moves past its end.
 * Returns the word count, or -1 after a syntax error. */
static int split_command(const char *s, uint32_t len, uint32_t *pos, struct shell_output *o)
{
    uint32_t i = *pos, w = 0;
    int argc = 0;
    for (;;) {
        while (i < len && is_blank(s, i, len))
            i += s[i] == '\\' ? 2 : 1;
        if (i >= len)
            break;
        if (s[i] == '\n' || s[i] == ';') {
            i++;
            break;
        }
        if (s[i] == '#') {
            while (i < len && s[i] != '\n')
                i++;
            continue;
        }
        if (argc == SHELL_MAX_WORDS)
            return syntax_error("too many words in one command", len, pos, o);
        words[argc++] = &word_buf[w];
        while (i < len && !ends_word(s[i])) {
            char c = s[i++];
            if (c == '\\') {
                if (i < len && s[i] != '\n')
                    word_buf[w++] = s[i];
                if (i < len)
                    i++;
            } else if (c == '\'' || c == '"') {
                while (i < len && s[i] != c) {
                    if (c == '"' && s[i] == '\\' && i + 1 < len && (s[i + 1] == '"' || s[i + 1] == '\\'))
                        i++;
                    word_buf[w++] = s[i++];
                }
                if (i >= len)
                    return syntax_error("unterminated quoted string", len, pos, o);
                i++;
            } else {
                word_buf[w++] = c;
            }
        }
        word_buf[w++] = 0;
    }
    *pos = i;
    return argc;
}

int shell_run_next(const char *script, uint32_t len, uint32_t *pos, struct shell_output *o)
{
    o->out_len = o->err_len = 0;
    o->overflowed = 0;
    while (*pos < len) {
        int argc = split_command(script, len, pos, o);
        if (argc < 0)
            return SHELL_SYNTAX_ERROR_STATUS;
        if (argc > 0)
            return shell_run_argv(argc, words, o);
    }
    return -1;
}

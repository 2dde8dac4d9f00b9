/* uart probe: says hello over COM1, echoes one line of host input, reports. */
#include "probe.h"

int probe_main(void)
{
    put_line("hello from the uart probe");
    put_str("cmdline: ");
    put_line(g_cmdline);
    put_str("memory bytes: ");
    put_dec(g_mem_bytes);
    put_char('\n');
    if (cmdline_get_u64("echo", 0)) {
        char line[128];
        size_t n = 0;
        for (;;) {
            int c = get_char();
            if (c < 0) {
                put_line("PROBE uart FAIL no input");
                return 1;
            }
            if (c == '\n' || c == '\r' || n + 1 == sizeof(line))
                break;
            line[n++] = (char)c;
        }
        line[n] = 0;
        put_str("echo: ");
        put_line(line);
    }
    put_line("PROBE uart OK");
    return 0;
}

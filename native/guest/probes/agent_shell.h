/* agent_shell.h — the agent probe's commands: built-ins standing in for busybox applets.
 *   echo [-n] ARGS…   true   false   uname (prints "supermachine-probe-agent")
 *   count             increments a counter in guest RAM and prints it (a restored snapshot
 *                     continues it)
 *   date, date -s @N  a UTC clock the host sets, advancing with kvmclock
 *   hostname [NAME]   prints (or sets) /proc/sys/kernel/hostname of the file table
 *   cat FILE…         files of the file table (agent_files.h)
 *   touch MIB         writes one word per 4 KiB page of MIB fresh MiB of guest RAM (a
 *                     working set for memory benchmarks) and says how long it took
 * A command names a built-in by its last path component (/bin/echo is echo). Anything else
 * prints "probe-agent: <cmd>: not a built-in command" on stderr and exits 127.
 * A script is split into commands at newlines and unquoted ';', and each command into words
 * (blanks separate; '…' and "…" quote; \ escapes; # starts a comment). There are no
 * expansions, pipes or redirections. Built-ins cannot be interrupted: each runs to its end
 * at once. */
#ifndef SM_AGENT_SHELL_H
#define SM_AGENT_SHELL_H

#include <stdint.h>

#define SHELL_SCRIPT_MAX_BYTES 4096u  /* a script, or an argv's strings with their NULs */
#define SHELL_MAX_WORDS 256
#define SHELL_STDOUT_BYTES 65536u     /* one command's output at most; more is dropped */
#define SHELL_STDERR_BYTES 8192u
#define SHELL_NOT_FOUND_STATUS 127
#define SHELL_SYNTAX_ERROR_STATUS 2

/* What one command wrote. */
struct shell_output {
    uint8_t out[SHELL_STDOUT_BYTES];
    uint32_t out_len;
    uint8_t err[SHELL_STDERR_BYTES];
    uint32_t err_len;
    int overflowed;
};

/* Runs the next command of script[*pos..len) and moves *pos past it; its output replaces
 * o's. Returns its exit status, or -1 when no command was left (blanks, comments). A syntax
 * error ends the script: status 2, *pos = len. */
int shell_run_next(const char *script, uint32_t len, uint32_t *pos, struct shell_output *o);
/* Runs argv as it is (EXEC in argv mode); its output replaces o's. */
int shell_run_argv(int argc, const char *const *argv, struct shell_output *o);

#endif

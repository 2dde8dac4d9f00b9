/* users.h — the user an EXEC runs as (PROTOCOL.md, EXEC flags bit 1), resolved the way OCI
 * runtimes read an image's `User`: "name", "uid", "uid:gid", "name:group" (either half a name
 * or a number), looked up in the image's /etc/passwd and /etc/group, with the supplementary
 * groups /etc/group lists the user in. Called in the forked child, before exec. */
#ifndef SUPERMACHINE_USERS_H
#define SUPERMACHINE_USERS_H

#include <stddef.h>
#include <sys/types.h>

#define SM_MAX_GROUPS 64

struct sm_user {
    uid_t uid;
    gid_t gid;
    gid_t groups[SM_MAX_GROUPS];  /* supplementary, the primary gid first */
    int ngroups;
    char home[256];               /* "" when the passwd file has no entry */
};

/* Resolve `spec` into `out`; returns 0, or -1 with a message in err (which names the user or
 * group and the file). Reads only regular files, and at most 1 MiB of each. */
int sm_resolve_user(const char *spec, struct sm_user *out, char *err, size_t errlen);

/* setgroups + setgid + setuid; returns 0, or -1 with errno set. */
int sm_become_user(const struct sm_user *user);

#endif

/* users.c — see users.h. The files are parsed here rather than with getpwnam(3): a guest
 * file that is a FIFO must not block the agent's child forever (each file is opened
 * non-blocking and must be a regular file), and libc's name services are no part of it. */
#define _GNU_SOURCE
#include "users.h"

#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILE_BYTES (1024 * 1024)
#define MAX_FIELDS 8

/* The whole of a small regular file, NUL-terminated; NULL when absent or not regular. */
static char *read_small_file(const char *path)
{
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    struct stat st;
    if (fd < 0)
        return NULL;
    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return NULL;
    }
    char *buf = malloc(MAX_FILE_BYTES + 1);
    size_t len = 0;
    while (buf && len < MAX_FILE_BYTES) {
        ssize_t n = read(fd, buf + len, MAX_FILE_BYTES - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        len += (size_t)n;
    }
    close(fd);
    if (buf)
        buf[len] = 0;
    return buf;
}

/* Split one line (modified in place) at ':' into at most MAX_FIELDS fields. */
static int split_fields(char *line, char **fields)
{
    int n = 0;
    fields[n++] = line;
    for (char *p = line; *p && n < MAX_FIELDS; p++)
        if (*p == ':') {
            *p = 0;
            fields[n++] = p + 1;
        }
    return n;
}

/* A decimal id; -1 when `s` is not one. */
static long long parse_id(const char *s)
{
    if (!*s)
        return -1;
    long long v = 0;
    for (; *s; s++) {
        if (*s < '0' || *s > '9' || v > 0xFFFFFFFELL / 10)
            return -1;
        v = v * 10 + (*s - '0');
    }
    return v > 0xFFFFFFFELL ? -1 : v;
}

/* Calls `match` for each well-formed line of `file` (a copy made for it) until it returns 1. */
static int each_line(const char *file, int min_fields, int (*match)(char **f, int n, void *ctx),
                     void *ctx)
{
    if (!file)
        return 0;
    const char *p = file;
    char line[4096];
    while (*p) {
        const char *end = strchr(p, '\n');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        if (len < sizeof line) {
            memcpy(line, p, len);
            line[len] = 0;
            char *fields[MAX_FIELDS];
            int n = split_fields(line, fields);
            if (line[0] != '#' && n >= min_fields && match(fields, n, ctx))
                return 1;
        }
        p += len + (end ? 1 : 0);
    }
    return 0;
}

struct passwd_query {
    const char *name;   /* match by name, or */
    long long uid;      /* by uid when name is NULL */
    char found_name[256];
    long long found_uid, found_gid;
    char home[256];
};

static int passwd_match(char **f, int n, void *ctx)
{
    struct passwd_query *q = ctx;
    long long uid = parse_id(f[2]), gid = parse_id(f[3]);
    if (uid < 0 || gid < 0)
        return 0;
    if (q->name ? strcmp(f[0], q->name) != 0 : uid != q->uid)
        return 0;
    snprintf(q->found_name, sizeof q->found_name, "%s", f[0]);
    q->found_uid = uid;
    q->found_gid = gid;
    snprintf(q->home, sizeof q->home, "%s", n > 5 ? f[5] : "");
    return 1;
}

struct group_query {
    const char *name;
    long long gid;
};

static int group_match(char **f, int n, void *ctx)
{
    (void)n;
    struct group_query *q = ctx;
    long long gid = parse_id(f[2]);
    if (gid < 0 || strcmp(f[0], q->name) != 0)
        return 0;
    q->gid = gid;
    return 1;
}

struct member_query {
    const char *user;
    struct sm_user *out;
};

static int member_match(char **f, int n, void *ctx)
{
    struct member_query *q = ctx;
    long long gid = parse_id(f[2]);
    if (gid < 0 || n < 4)
        return 0;
    for (char *m = f[3]; m && *m;) {
        char *comma = strchr(m, ',');
        size_t len = comma ? (size_t)(comma - m) : strlen(m);
        if (len == strlen(q->user) && strncmp(m, q->user, len) == 0) {
            int seen = 0;
            for (int i = 0; i < q->out->ngroups; i++)
                seen |= q->out->groups[i] == (gid_t)gid;
            if (!seen && q->out->ngroups < SM_MAX_GROUPS)
                q->out->groups[q->out->ngroups++] = (gid_t)gid;
            break;
        }
        m = comma ? comma + 1 : NULL;
    }
    return 0;   /* every group is looked at */
}

int sm_resolve_user(const char *spec, struct sm_user *out, char *err, size_t errlen)
{
    char user[256], group[256] = "";
    const char *colon = strchr(spec, ':');
    size_t ulen = colon ? (size_t)(colon - spec) : strlen(spec);
    if (ulen == 0 || ulen >= sizeof user || (colon && (!colon[1] || strlen(colon + 1) >= sizeof group))) {
        snprintf(err, errlen, "user '%s' is not of the form name, uid, name:group or uid:gid", spec);
        return -1;
    }
    memcpy(user, spec, ulen);
    user[ulen] = 0;
    if (colon)
        snprintf(group, sizeof group, "%s", colon + 1);

    memset(out, 0, sizeof *out);
    char *passwd = read_small_file("/etc/passwd");
    struct passwd_query pq = { .name = NULL, .uid = parse_id(user) };
    int found;
    if (pq.uid >= 0) {
        found = each_line(passwd, 4, passwd_match, &pq);
        out->uid = (uid_t)pq.uid;
        out->gid = found ? (gid_t)pq.found_gid : 0;   /* an unlisted uid runs with gid 0 */
    } else {
        pq.name = user;
        found = each_line(passwd, 4, passwd_match, &pq);
        if (!found) {
            snprintf(err, errlen, "user '%s' not found in the image's /etc/passwd%s", user,
                     passwd ? "" : " (it has no /etc/passwd)");
            free(passwd);
            return -1;
        }
        out->uid = (uid_t)pq.found_uid;
        out->gid = (gid_t)pq.found_gid;
    }
    free(passwd);
    if (found)
        snprintf(out->home, sizeof out->home, "%s", pq.home);

    char *groups = read_small_file("/etc/group");
    if (*group) {
        struct group_query gq = { .name = group, .gid = parse_id(group) };
        if (gq.gid < 0 && !each_line(groups, 3, group_match, &gq)) {
            snprintf(err, errlen, "group '%s' (of user '%s') not found in the image's /etc/group%s",
                     group, spec, groups ? "" : " (it has no /etc/group)");
            free(groups);
            return -1;
        }
        out->gid = (gid_t)gq.gid;
    }
    out->groups[out->ngroups++] = out->gid;
    if (found) {
        struct member_query mq = { .user = pq.found_name, .out = out };
        each_line(groups, 4, member_match, &mq);
    }
    free(groups);
    return 0;
}

int sm_become_user(const struct sm_user *user)
{
    if (setgroups((size_t)user->ngroups, user->groups) < 0 || setgid(user->gid) < 0
        || setuid(user->uid) < 0)
        return -1;
    return 0;
}

/* event_loop.c — epoll thread. Registrations live in a table keyed by fd; one event is
 * dispatched per epoll_wait so a callback may remove any registration safely. */
#define _GNU_SOURCE
#include "event_loop.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define SM_EVENT_LOOP_MAX_FDS 16384

typedef struct registration {
    int fd;
    int used;
    sm_event_callback cb;
    void *opaque;
} registration;

struct sm_event_loop {
    int epoll_fd;
    int wake_fd;
    int stop;
    int thread_started;
    pthread_t thread;
    pthread_mutex_t lock;
    registration regs[SM_EVENT_LOOP_MAX_FDS];
};

sm_event_loop *sm_event_loop_create(char *err, size_t err_len)
{
    sm_event_loop *l = calloc(1, sizeof(*l));
    if (!l) {
        snprintf(err, err_len, "out of memory for the event loop");
        return NULL;
    }
    pthread_mutex_init(&l->lock, NULL);
    l->epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    l->wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (l->epoll_fd < 0 || l->wake_fd < 0) {
        snprintf(err, err_len, "epoll/eventfd creation failed: %s", strerror(errno));
        sm_event_loop_destroy(l);
        return NULL;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = -1};
    epoll_ctl(l->epoll_fd, EPOLL_CTL_ADD, l->wake_fd, &ev);
    return l;
}

static void *loop_thread(void *arg)
{
    sm_event_loop *l = arg;
    pthread_setname_np(pthread_self(), "sm-events");
    for (;;) {
        struct epoll_event ev;
        int n = epoll_wait(l->epoll_fd, &ev, 1, -1);
        if (__atomic_load_n(&l->stop, __ATOMIC_ACQUIRE))
            break;
        if (n <= 0)
            continue;
        if (ev.data.fd == -1) {
            uint64_t v;
            (void)!read(l->wake_fd, &v, sizeof(v));
            continue;
        }
        int fd = ev.data.fd;
        pthread_mutex_lock(&l->lock);
        registration r = {0};
        if (fd >= 0 && fd < SM_EVENT_LOOP_MAX_FDS && l->regs[fd].used)
            r = l->regs[fd];
        pthread_mutex_unlock(&l->lock);
        if (r.used)
            r.cb(r.opaque, fd, ev.events);
    }
    return NULL;
}

int sm_event_loop_start(sm_event_loop *l, char *err, size_t err_len)
{
    int rc = pthread_create(&l->thread, NULL, loop_thread, l);
    if (rc != 0) {
        snprintf(err, err_len, "pthread_create for the event loop failed: %s", strerror(rc));
        return -1;
    }
    l->thread_started = 1;
    return 0;
}

void sm_event_loop_stop(sm_event_loop *l)
{
    if (!l || !l->thread_started)
        return;
    __atomic_store_n(&l->stop, 1, __ATOMIC_RELEASE);
    uint64_t one = 1;
    (void)!write(l->wake_fd, &one, sizeof(one));
    pthread_join(l->thread, NULL);
    l->thread_started = 0;
}

void sm_event_loop_destroy(sm_event_loop *l)
{
    if (!l)
        return;
    sm_event_loop_stop(l);
    if (l->epoll_fd >= 0)
        close(l->epoll_fd);
    if (l->wake_fd >= 0)
        close(l->wake_fd);
    pthread_mutex_destroy(&l->lock);
    free(l);
}

int sm_event_loop_add(sm_event_loop *l, int fd, uint32_t events, sm_event_callback cb, void *opaque)
{
    if (fd < 0 || fd >= SM_EVENT_LOOP_MAX_FDS)
        return -1;
    pthread_mutex_lock(&l->lock);
    l->regs[fd] = (registration){fd, 1, cb, opaque};
    pthread_mutex_unlock(&l->lock);
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(l->epoll_fd, EPOLL_CTL_ADD, fd, &ev) < 0) {
        pthread_mutex_lock(&l->lock);
        l->regs[fd].used = 0;
        pthread_mutex_unlock(&l->lock);
        return -1;
    }
    return 0;
}

int sm_event_loop_modify(sm_event_loop *l, int fd, uint32_t events)
{
    struct epoll_event ev = {.events = events, .data.fd = fd};
    return epoll_ctl(l->epoll_fd, EPOLL_CTL_MOD, fd, &ev);
}

int sm_event_loop_remove(sm_event_loop *l, int fd)
{
    if (fd < 0 || fd >= SM_EVENT_LOOP_MAX_FDS)
        return -1;
    epoll_ctl(l->epoll_fd, EPOLL_CTL_DEL, fd, NULL);
    pthread_mutex_lock(&l->lock);
    l->regs[fd].used = 0;
    pthread_mutex_unlock(&l->lock);
    return 0;
}

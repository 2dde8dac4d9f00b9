/* event_loop.h — one epoll thread per VM for host-side device work (vsock sockets,
 * balloon statistics timer). Callbacks run on that thread. */
#ifndef SM_EVENT_LOOP_H
#define SM_EVENT_LOOP_H

#include <pthread.h>
#include <stdint.h>

typedef void (*sm_event_callback)(void *opaque, int fd, uint32_t events);

typedef struct sm_event_loop sm_event_loop;

sm_event_loop *sm_event_loop_create(char *err, size_t err_len);
int sm_event_loop_start(sm_event_loop *loop, char *err, size_t err_len);
/* Stops and joins the thread (idempotent). Registered fds are not closed. */
void sm_event_loop_stop(sm_event_loop *loop);
void sm_event_loop_destroy(sm_event_loop *loop);
/* Register / change / remove fd. Safe from any thread, including callbacks. */
int sm_event_loop_add(sm_event_loop *loop, int fd, uint32_t events, sm_event_callback cb, void *opaque);
int sm_event_loop_modify(sm_event_loop *loop, int fd, uint32_t events);
int sm_event_loop_remove(sm_event_loop *loop, int fd);

#endif

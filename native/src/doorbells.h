/* doorbells.h — KVM ioeventfds for the virtio-mmio queues' QueueNotify register, so that a
 * guest's notify of a live queue does not exit to the VMM (see sm_virtio_doorbells). */
#ifndef SM_DOORBELLS_H
#define SM_DOORBELLS_H

#include <stddef.h>

struct sm_vm;
struct sm_virtio_mmio;
typedef struct sm_queue_doorbells sm_queue_doorbells;

/* Whether this VM's KVM takes ioeventfds (KVM_CAP_IOEVENTFD). */
int sm_doorbells_available(struct sm_vm *vm);
/* One eventfd per queue of t, polled by vm->loop from now on, handed to t as its doorbells;
 * NULL with err if an eventfd or its registration fails. */
sm_queue_doorbells *sm_doorbells_attach(struct sm_vm *vm, struct sm_virtio_mmio *t, char *err,
                                        size_t err_len);
/* After vm->loop has stopped: closes the eventfds (KVM drops its ioeventfds with the VM). */
void sm_doorbells_destroy(sm_queue_doorbells *d);

#endif

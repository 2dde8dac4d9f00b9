/* doorbells.c — a queue's doorbell is an eventfd that KVM signals, inside the kernel, when
 * the guest writes the queue's index (4 bytes) to its transport's QueueNotify: KVM_IOEVENTFD
 * with DATAMATCH. The event loop thread polls it and hands the ring to the transport, which
 * runs the device's notify under its lock as the MMIO exit path does. Each eventfd stays
 * registered with the loop for the VM's whole life and is closed only after the loop has
 * stopped, so no callback ever reads an fd number reused by something else; arming and
 * disarming only assign and deassign it in KVM. */
#define _GNU_SOURCE
#include "doorbells.h"
#include "sm_internal.h"
#include "event_loop.h"
#include "devices/virtio_mmio.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define SM_DOORBELL_WRITE_BYTES 4   /* virtio-mmio registers are 32-bit */

typedef struct sm_doorbell {
    sm_queue_doorbells *set;
    uint16_t queue;
    int fd;
    int arm_failure_noted;
} sm_doorbell;

struct sm_queue_doorbells {
    struct sm_vm *vm;
    sm_virtio_mmio *t;
    uint16_t n_queues;
    sm_doorbell bells[SM_VIRTIO_MAX_QUEUES];
};

int sm_doorbells_available(struct sm_vm *vm)
{
    return ioctl(vm->vm_fd, KVM_CHECK_EXTENSION, KVM_CAP_IOEVENTFD) > 0;
}

static int assign(sm_doorbell *b, uint32_t flags)
{
    struct kvm_ioeventfd io = {
        .datamatch = b->queue,
        .addr = b->set->t->base_gpa + SM_VIRTIO_MMIO_QUEUE_NOTIFY,
        .len = SM_DOORBELL_WRITE_BYTES,
        .fd = b->fd,
        .flags = KVM_IOEVENTFD_FLAG_DATAMATCH | flags,
    };
    return ioctl(b->set->vm->vm_fd, KVM_IOEVENTFD, &io);
}

static int arm(void *ctx, uint16_t queue)
{
    sm_doorbell *b = &((sm_queue_doorbells *)ctx)->bells[queue];
    if (assign(b, 0) == 0)
        return 0;
    if (!b->arm_failure_noted) {   /* the queue still works, through MMIO exits */
        b->arm_failure_noted = 1;
        sm_vm_console_note(b->set->vm, "%s queue %u: KVM_IOEVENTFD failed (%s); its notifies "
                           "exit to the VMM", b->set->t->name, queue, strerror(errno));
    }
    return -1;
}

static void disarm(void *ctx, uint16_t queue)
{
    (void)assign(&((sm_queue_doorbells *)ctx)->bells[queue], KVM_IOEVENTFD_FLAG_DEASSIGN);
}

static int take(void *ctx, uint16_t queue)
{
    uint64_t rings;
    return read(((sm_queue_doorbells *)ctx)->bells[queue].fd, &rings, sizeof(rings)) ==
               (ssize_t)sizeof(rings) && rings > 0;
}

static void rang(void *opaque, int fd, uint32_t events)
{
    sm_doorbell *b = opaque;
    (void)fd;
    (void)events;
    sm_virtio_mmio_doorbell(b->set->t, b->queue);
}

sm_queue_doorbells *sm_doorbells_attach(struct sm_vm *vm, sm_virtio_mmio *t, char *err,
                                        size_t err_len)
{
    sm_queue_doorbells *d = calloc(1, sizeof(*d));
    if (!d) {
        snprintf(err, err_len, "out of memory for the doorbells of %s", t->name);
        return NULL;
    }
    d->vm = vm;
    d->t = t;
    for (uint16_t q = 0; q < SM_VIRTIO_MAX_QUEUES; q++)
        d->bells[q] = (sm_doorbell){.set = d, .queue = q, .fd = -1};
    for (uint16_t q = 0; q < t->ops->num_queues; q++) {
        sm_doorbell *b = &d->bells[q];
        b->fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
        if (b->fd < 0 || sm_event_loop_add(vm->loop, b->fd, EPOLLIN, rang, b) < 0) {
            snprintf(err, err_len, "%s queue %u: doorbell eventfd setup failed: %s", t->name, q,
                     strerror(errno));
            if (b->fd >= 0)
                close(b->fd);
            b->fd = -1;
            d->n_queues = q;
            sm_doorbells_destroy(d);
            return NULL;
        }
        d->n_queues = (uint16_t)(q + 1);
    }
    sm_virtio_mmio_set_doorbells(t, (sm_virtio_doorbells){.arm = arm, .disarm = disarm,
                                                          .take = take, .ctx = d});
    return d;
}

void sm_doorbells_destroy(sm_queue_doorbells *d)
{
    if (!d)
        return;
    for (uint16_t q = 0; q < d->n_queues; q++) {
        sm_event_loop_remove(d->vm->loop, d->bells[q].fd);
        close(d->bells[q].fd);
    }
    free(d);
}

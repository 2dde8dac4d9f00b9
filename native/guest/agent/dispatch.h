/* dispatch.h — what an agent does with the bytes the host sends (PROTOCOL.md): frames out of
 * them, with resynchronisation; the session gate (nothing but HELLO before a HELLO); HELLO,
 * PING and POWEROFF; ERROR frames from the host (never answered; on a stream, the host gives
 * that stream up); each request type to the agent's handler; and the ERROR for anything
 * else. Shared by the guest agent
 * (agent.c) and the agent probe (native/guest/probes/agent.c), which differ in what a
 * command, a file and a poweroff are. Builds hosted and freestanding (no printf, no heap). */
#ifndef SUPERMACHINE_DISPATCH_H
#define SUPERMACHINE_DISPATCH_H

#include "protocol.h"

typedef void (*sm_request_handler)(const struct sm_header *h, struct sm_cursor *payload);

struct sm_agent {
    const char *software;  /* the HELLO answer's software string */
    void (*send_frame)(uint8_t type, uint32_t stream, const uint8_t *payload, size_t len);
    void (*send_error)(uint32_t stream, uint32_t code, const struct sm_text *message);
    void (*forget_streams)(void);  /* the session ends: stop its commands, drop its streams */
    void (*power_off)(void);       /* end the VM */
    sm_request_handler exec, stdin_data, signal, credit, write_file, read_file;
    /* The host's ERROR on a stream: it gives the stream up (NULL: ignored). */
    sm_request_handler abandon;
    /* state */
    int session_ready;
    struct sm_parser parser;
};

/* Answers every whole frame at the start of buf[0..len); returns how many bytes that took.
 * What is left is the start of a frame: keep it for the next call, with more bytes. */
size_t sm_agent_serve(struct sm_agent *a, const uint8_t *buf, size_t len);

/* The host went away: the session's streams are forgotten, and the next connection starts
 * from its first byte with a HELLO. */
void sm_agent_end_session(struct sm_agent *a);

#endif

/* dispatch.c — see dispatch.h. */
#include "dispatch.h"

#include <string.h>

#define HELLO_PAYLOAD_BYTES 128

static void refuse(struct sm_agent *a, uint32_t stream, uint32_t code, const char *why)
{
    struct sm_text message = { .len = 0 };
    sm_text_str(&message, why);
    a->send_error(stream, code, &message);
}

/* A refusal that names the frame's type. */
static void refuse_type(struct sm_agent *a, const struct sm_header *h, uint32_t code,
                        const char *before, const char *after)
{
    struct sm_text message = { .len = 0 };
    sm_text_str(&message, before);
    sm_text_type(&message, h->type);
    sm_text_str(&message, after);
    a->send_error(h->stream, code, &message);
}

static void too_long(struct sm_agent *a, const struct sm_header *h)
{
    struct sm_text message = { .len = 0 };
    sm_text_str(&message, "frame length ");
    sm_text_dec(&message, h->length);
    sm_text_str(&message, " exceeds the maximum ");
    sm_text_dec(&message, SM_MAX_PAYLOAD_BYTES);
    a->send_error(h->stream, SM_E_TOO_LONG, &message);
}

/* Stream 0, u32 version, str software; whatever the version, we answer with ours (the host
 * decides), and a new session starts. */
static void hello(struct sm_agent *a, const struct sm_header *h, struct sm_cursor *c)
{
    uint32_t version, len;
    const uint8_t *software;
    if (h->stream != 0 || !sm_get_u32(c, &version) || !sm_get_str(c, &software, &len) ||
        !sm_at_end(c)) {
        refuse(a, h->stream, SM_E_BAD_PAYLOAD, "HELLO needs stream 0, u32 version, str");
        return;
    }
    a->forget_streams();
    a->session_ready = 1;
    uint8_t payload[HELLO_PAYLOAD_BYTES];
    struct sm_builder b = { payload, 0, sizeof payload, 0 };
    if (sm_put_u32(&b, SM_PROTOCOL_VERSION) && sm_put_str(&b, a->software, strlen(a->software)))
        a->send_frame(SM_HELLO, 0, b.data, b.len);
}

static void dispatch(struct sm_agent *a, const struct sm_header *h, const uint8_t *payload)
{
    struct sm_cursor c = { payload, h->length, 0 };
    sm_request_handler handler;
    if (h->type == SM_HELLO) {
        hello(a, h, &c);
        return;
    }
    if (!a->session_ready) {
        refuse_type(a, h, SM_E_NOT_READY, "frame type ", " before HELLO");
        return;
    }
    switch (h->type) {
    case SM_PING:
        a->send_frame(SM_PONG, h->stream, payload, h->length);
        return;
    case SM_POWEROFF:
        if (h->stream != 0 || h->length != 0)
            refuse(a, h->stream, SM_E_BAD_PAYLOAD, "POWEROFF takes stream 0 and no payload");
        else
            a->power_off();
        return;
    case SM_ERROR:
        /* Never answered. On stream 0 the host reports our mistake; on a stream of ours it
         * gives that stream up (it stopped reading a file, stopped waiting for a command). */
        if (h->stream != 0 && a->abandon)
            a->abandon(h, &c);
        return;
    case SM_EXEC: handler = a->exec; break;
    case SM_STDIN: handler = a->stdin_data; break;
    case SM_SIGNAL: handler = a->signal; break;
    case SM_CREDIT: handler = a->credit; break;
    case SM_WRITE_FILE: handler = a->write_file; break;
    case SM_READ_FILE: handler = a->read_file; break;
    default:
        refuse_type(a, h, SM_E_BAD_TYPE, "unknown frame type ", "");
        return;
    }
    handler(h, &c);
}

size_t sm_agent_serve(struct sm_agent *a, const uint8_t *buf, size_t len)
{
    size_t pos = 0;
    struct sm_header h;
    const uint8_t *payload;
    for (;;) {
        switch (sm_parse_next(&a->parser, buf, len, &pos, &h, &payload)) {
        case SM_PARSE_NEED_MORE:
            return pos;
        case SM_PARSE_BAD_HEADER:
            refuse(a, 0, SM_E_BAD_HEADER, "bad frame header (magic, flags or CRC); resynchronising");
            break;
        case SM_PARSE_TOO_LONG:
            too_long(a, &h);
            break;
        case SM_PARSE_FRAME:
            dispatch(a, &h, payload);
            break;
        }
    }
}

void sm_agent_end_session(struct sm_agent *a)
{
    a->forget_streams();
    a->session_ready = 0;
    a->parser.resyncing = 0;
}

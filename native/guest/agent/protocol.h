/* The agent protocol (native/guest/PROTOCOL.md): constants, frame header, payload cursor. */
#ifndef SUPERMACHINE_PROTOCOL_H
#define SUPERMACHINE_PROTOCOL_H

#include <stddef.h>
#include <stdint.h>

#define SM_PROTOCOL_VERSION 1u
#define SM_HEADER_BYTES 16u
#define SM_MAX_PAYLOAD_BYTES (1024u * 1024u)
#define SM_MAX_CHUNK_BYTES 65536u
#define SM_INITIAL_WINDOW_BYTES 262144u
#define SM_MAX_STREAMS 64
#define SM_MAGIC0 0x53 /* 'S' */
#define SM_MAGIC1 0x4D /* 'M' */

enum sm_frame_type {
    SM_HELLO = 0x01,
    SM_PING = 0x02,
    SM_PONG = 0x03,
    SM_POWEROFF = 0x04,
    SM_EXEC = 0x10,
    SM_STARTED = 0x11,
    SM_STDIN = 0x12,
    SM_STDOUT = 0x13,
    SM_STDERR = 0x14,
    SM_EXIT = 0x15,
    SM_SIGNAL = 0x16,
    SM_CREDIT = 0x17,
    SM_WRITE_FILE = 0x20,
    SM_READ_FILE = 0x21,
    SM_FILE_DATA = 0x22,
    SM_OK = 0x23,
    SM_ERROR = 0x7F,
};

enum sm_error_code {
    SM_E_BAD_HEADER = 1,
    SM_E_TOO_LONG = 2,
    SM_E_BAD_TYPE = 3,
    SM_E_BAD_STREAM = 4,
    SM_E_BAD_PAYLOAD = 5,
    SM_E_TOO_MANY = 6,
    SM_E_EXEC_FAILED = 7,
    SM_E_IO_FAILED = 8,
    SM_E_FLOW = 9,
    SM_E_NOT_READY = 10,
};

struct sm_header {
    uint8_t type;
    uint8_t flags;
    uint32_t stream;
    uint32_t length;
};

enum sm_header_status { SM_HEADER_OK, SM_HEADER_BAD, SM_HEADER_TOO_LONG };

uint32_t sm_crc32(const uint8_t *data, size_t len);
void sm_encode_header(uint8_t out[SM_HEADER_BYTES], uint8_t type, uint32_t stream, uint32_t length);
enum sm_header_status sm_decode_header(const uint8_t in[SM_HEADER_BYTES], struct sm_header *out);

/* Frames out of received bytes, with PROTOCOL.md's resynchronisation. The receiver keeps the
 * bytes in a buffer and calls sm_parse_next() from *pos = 0 until it needs more; then it
 * drops buf[0..*pos) and reads on. */
struct sm_parser {
    int resyncing;  /* skipping bytes after a bad header */
};

enum sm_parse_result {
    SM_PARSE_NEED_MORE,   /* no whole frame at *pos yet */
    SM_PARSE_FRAME,       /* *h and *payload: a whole frame */
    SM_PARSE_BAD_HEADER,  /* the first bad header of a run: answer ERROR BAD_HEADER on stream 0 */
    SM_PARSE_TOO_LONG,    /* *h announces more than the maximum: answer ERROR TOO_LONG on its
                           * stream; its payload is not skipped (the sender never sends it) */
};

enum sm_parse_result sm_parse_next(struct sm_parser *p, const uint8_t *buf, size_t len, size_t *pos,
                                   struct sm_header *h, const uint8_t **payload);

/* A read cursor over a payload: every getter fails (returns 0) instead of reading past the end. */
struct sm_cursor {
    const uint8_t *data;
    size_t len;
    size_t pos;
};

int sm_get_u32(struct sm_cursor *c, uint32_t *out);
/* A string: points into the payload (not NUL-terminated); *len receives its length. */
int sm_get_str(struct sm_cursor *c, const uint8_t **str, uint32_t *len);
int sm_at_end(const struct sm_cursor *c);

/* An output payload. One started empty ({ 0 }) grows on the heap (hosted builds; the
 * freestanding agent probe has no heap); one given storage ({ buf, 0, sizeof buf }) never
 * grows: a put that does not fit fails. */
struct sm_builder {
    uint8_t *data;
    size_t len;
    size_t cap;
    int on_heap;
};

int sm_put_u32(struct sm_builder *b, uint32_t v);
int sm_put_u64(struct sm_builder *b, uint64_t v);
int sm_put_str(struct sm_builder *b, const char *s, size_t len);
#if __STDC_HOSTED__
void sm_builder_free(struct sm_builder *b);
#endif

/* An ERROR frame's message, composed without printf (the agent probe has none); what does
 * not fit is cut. */
#define SM_TEXT_MAX_BYTES 512
struct sm_text {
    char data[SM_TEXT_MAX_BYTES];
    size_t len;
};

void sm_text_bytes(struct sm_text *t, const void *p, size_t n);
void sm_text_str(struct sm_text *t, const char *s);
void sm_text_dec(struct sm_text *t, uint64_t v);
void sm_text_type(struct sm_text *t, uint8_t type);  /* a frame type as "0x1f" */

#endif

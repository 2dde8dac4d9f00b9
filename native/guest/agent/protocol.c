/* Frame header encoding/decoding and payload helpers of the agent protocol. */
#include "protocol.h"

#include <string.h>
#if __STDC_HOSTED__
#include <stdlib.h>
#endif

static uint32_t crc_table[256];
static int crc_ready;

static void crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
    crc_ready = 1;
}

uint32_t sm_crc32(const uint8_t *data, size_t len)
{
    if (!crc_ready)
        crc_init();
    uint32_t c = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++)
        c = crc_table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_le32(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
    p[2] = (uint8_t)(v >> 16);
    p[3] = (uint8_t)(v >> 24);
}

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

void sm_encode_header(uint8_t out[SM_HEADER_BYTES], uint8_t type, uint32_t stream, uint32_t length)
{
    out[0] = SM_MAGIC0;
    out[1] = SM_MAGIC1;
    out[2] = type;
    out[3] = 0;
    put_le32(out + 4, stream);
    put_le32(out + 8, length);
    put_le32(out + 12, sm_crc32(out, 12));
}

enum sm_header_status sm_decode_header(const uint8_t in[SM_HEADER_BYTES], struct sm_header *out)
{
    if (in[0] != SM_MAGIC0 || in[1] != SM_MAGIC1 || in[3] != 0)
        return SM_HEADER_BAD;
    if (get_le32(in + 12) != sm_crc32(in, 12))
        return SM_HEADER_BAD;
    out->type = in[2];
    out->flags = in[3];
    out->stream = get_le32(in + 4);
    out->length = get_le32(in + 8);
    return out->length > SM_MAX_PAYLOAD_BYTES ? SM_HEADER_TOO_LONG : SM_HEADER_OK;
}

enum sm_parse_result sm_parse_next(struct sm_parser *p, const uint8_t *buf, size_t len, size_t *pos,
                                   struct sm_header *h, const uint8_t **payload)
{
    while (len - *pos >= SM_HEADER_BYTES) {
        enum sm_header_status st = sm_decode_header(buf + *pos, h);
        if (st == SM_HEADER_BAD) {
            int first = !p->resyncing;
            p->resyncing = 1;
            (*pos)++;
            if (first)
                return SM_PARSE_BAD_HEADER;
            continue;
        }
        p->resyncing = 0;
        if (st == SM_HEADER_TOO_LONG) {
            *pos += SM_HEADER_BYTES;
            return SM_PARSE_TOO_LONG;
        }
        if (len - *pos - SM_HEADER_BYTES < h->length)
            return SM_PARSE_NEED_MORE;
        *payload = buf + *pos + SM_HEADER_BYTES;
        *pos += SM_HEADER_BYTES + h->length;
        return SM_PARSE_FRAME;
    }
    return SM_PARSE_NEED_MORE;
}

int sm_get_u32(struct sm_cursor *c, uint32_t *out)
{
    if (c->len - c->pos < 4)
        return 0;
    *out = get_le32(c->data + c->pos);
    c->pos += 4;
    return 1;
}

int sm_get_str(struct sm_cursor *c, const uint8_t **str, uint32_t *len)
{
    uint32_t n;
    if (!sm_get_u32(c, &n) || c->len - c->pos < n)
        return 0;
    *str = c->data + c->pos;
    *len = n;
    c->pos += n;
    return 1;
}

int sm_at_end(const struct sm_cursor *c)
{
    return c->pos == c->len;
}

static int reserve(struct sm_builder *b, size_t extra)
{
    if (b->len + extra <= b->cap)
        return 1;
#if !__STDC_HOSTED__
    return 0;
#else
    if (b->data && !b->on_heap)
        return 0; /* the caller's storage */
    size_t cap = b->cap ? b->cap : 64;
    while (cap < b->len + extra)
        cap *= 2;
    uint8_t *p = realloc(b->data, cap);
    if (!p)
        return 0;
    b->data = p;
    b->cap = cap;
    b->on_heap = 1;
    return 1;
#endif
}

int sm_put_u32(struct sm_builder *b, uint32_t v)
{
    if (!reserve(b, 4))
        return 0;
    put_le32(b->data + b->len, v);
    b->len += 4;
    return 1;
}

int sm_put_u64(struct sm_builder *b, uint64_t v)
{
    return sm_put_u32(b, (uint32_t)v) && sm_put_u32(b, (uint32_t)(v >> 32));
}

int sm_put_str(struct sm_builder *b, const char *s, size_t len)
{
    if (!sm_put_u32(b, (uint32_t)len) || !reserve(b, len))
        return 0;
    memcpy(b->data + b->len, s, len);
    b->len += len;
    return 1;
}

#if __STDC_HOSTED__
void sm_builder_free(struct sm_builder *b)
{
    if (b->on_heap)
        free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    b->on_heap = 0;
}
#endif

void sm_text_bytes(struct sm_text *t, const void *p, size_t n)
{
    if (n > SM_TEXT_MAX_BYTES - t->len)
        n = SM_TEXT_MAX_BYTES - t->len;
    memcpy(t->data + t->len, p, n);
    t->len += n;
}

void sm_text_str(struct sm_text *t, const char *s)
{
    sm_text_bytes(t, s, strlen(s));
}

void sm_text_dec(struct sm_text *t, uint64_t v)
{
    char digits[20];
    size_t n = sizeof digits;
    do {
        digits[--n] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    sm_text_bytes(t, digits + n, sizeof digits - n);
}

void sm_text_type(struct sm_text *t, uint8_t type)
{
    static const char hex[] = "0123456789abcdef";
    char s[4] = { '0', 'x', hex[type >> 4], hex[type & 15] };
    sm_text_bytes(t, s, sizeof s);
}

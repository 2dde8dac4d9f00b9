/* error_table.h — every device names its errors in a table indexed by its error enum; this
 * is the one lookup they share (out-of-range or unnamed codes get the device's fallback). */
#ifndef SM_DEVICES_ERROR_TABLE_H
#define SM_DEVICES_ERROR_TABLE_H

static inline const char *sm_error_table_lookup(const char *const *table, int count, int err,
                                                const char *unknown)
{
    return (err < 0 || err >= count || !table[err]) ? unknown : table[err];
}

#endif

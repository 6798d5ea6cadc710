/* A buffer kept by the calling thread between calls, grown when a call needs more: fresh memory costs a page
   fault per 4 KiB on its first touch, so a kernel called every step reuses what it touched. Each file that
   includes this keeps its own. */
#ifndef ANCHORKV_SCRATCH_H
#define ANCHORKV_SCRATCH_H
#include <stdlib.h>

static __thread void *scratch;
static __thread size_t scratch_bytes;

static void *grow(size_t bytes) {
    if (bytes > scratch_bytes) {
        free(scratch);
        scratch = malloc(bytes);
        scratch_bytes = scratch ? bytes : 0;
    }
    return scratch;
}

#endif

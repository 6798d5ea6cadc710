/* AMX's tiles, where this library was built for them (-march=native on a CPU with amx_tile and amx_bf16):
   the process asks the kernel once for the right to use them, and each thread that computes on them loads
   one configuration, every tile 16 rows of 64 bytes (A: 16 rows x 32 bf16; B: 16 pairs x 16 columns; C:
   16 x 16 floats). */
#ifndef ANCHORKV_AMX_H
#define ANCHORKV_AMX_H
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define HAVE_AMX 1
#include <immintrin.h>

static void tile_config(void) {
    struct { uint8_t palette, start; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    _tile_loadconfig(&cfg);
}
#else
#define HAVE_AMX 0
#endif

/* 1 where this library was built for AMX and the kernel lets this process use its tiles, else 0 */
static int amx_granted(void) {
#if HAVE_AMX
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
#else
    return 0;
#endif
}

#endif

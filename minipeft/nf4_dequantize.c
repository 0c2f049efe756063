/* NF4 -> float dequantisation on the CPU, compiled on first use by minipeft.quant (cc -O3 -march=native).

   x = NF4_CODE[q] * absmax (QLoRA's dequant(c, X) = X / c, with c = 1 / absmax), computed in float32 and
   rounded to the output type.
   Each byte holds two 4-bit indices q, the first value in the high nibble; every `blocksize` values share
   one absmax. This file only handles whole blocks of at least 32 values (16 bytes); minipeft.quant does the
   rest in PyTorch.

   Why C: the work per value is one 16-entry table lookup and one multiply, so speed is the number of values
   a loop handles per instruction. GCC's vector extensions write the lookup as __builtin_shuffle, one
   instruction (vpermps) on AVX-512 for 16 values at once; PyTorch's gather does one value at a time. */
#include <stdint.h>
#include <string.h>
#if __has_include(<sys/mman.h>)
#include <sys/mman.h>
#endif
#ifdef __F16C__
#include <immintrin.h>
#endif

typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));

enum { FLOAT32 = 0, BFLOAT16 = 1, FLOAT16 = 2 };

/* Stores 16 float32 values as `dtype` at out[0..15], rounding to nearest even. */
static inline void store16(f32x16 v, int dtype, char *out) {
    if (dtype == FLOAT32) {
        memcpy(out, &v, sizeof v);
    } else if (dtype == FLOAT16) {
#ifdef __F16C__  /* GCC converts to _Float16 one value at a time; F16C converts 8 */
        __m256 halves[2];
        memcpy(halves, &v, sizeof v);
        for (int half = 0; half < 2; half++) {
            __m128i h = _mm256_cvtps_ph(halves[half], _MM_FROUND_TO_NEAREST_INT);
            memcpy(out + half * sizeof h, &h, sizeof h);
        }
#else
        _Float16 h[16];
        for (int i = 0; i < 16; i++) h[i] = (_Float16)v[i];
        memcpy(out, h, sizeof h);
#endif
    } else {  /* bfloat16: the top 16 bits of the float32, rounded to nearest even */
        u32x16 bits;
        memcpy(&bits, &v, sizeof v);
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16;
        u16x16 b = __builtin_convertvector(bits, u16x16);
        memcpy(out, &b, sizeof b);
    }
}

/* The output is usually fresh memory, which the OS maps on first write, one 4 KiB page at a time: for a
   4096 x 4096 bfloat16 matrix, 8192 page faults that cost more than the dequantisation itself. Asking for
   2 MiB pages (Linux; a hint, ignored where unsupported) makes that 16. */
static void ask_for_huge_pages(char *start, size_t size) {
#ifdef MADV_HUGEPAGE
    const uintptr_t huge = (uintptr_t)1 << 21;
    const uintptr_t first = ((uintptr_t)start + huge - 1) & ~(huge - 1);
    const uintptr_t last = ((uintptr_t)start + size) & ~(huge - 1);
    if (last > first) madvise((void *)first, last - first, MADV_HUGEPAGE);
#else
    (void)start, (void)size;
#endif
}

void nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, int64_t num_blocks,
                    int64_t blocksize, int dtype, void *out) {
    const int element_size = dtype == FLOAT32 ? 4 : 2;
    const i32x16 first_half = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23};  /* interleave */
    const i32x16 second_half = first_half + 8;
    f32x16 table;
    memcpy(&table, code, sizeof table);
    char *dst = out;
    ask_for_huge_pages(dst, (size_t)(num_blocks * blocksize * element_size));
    for (int64_t block = 0; block < num_blocks; block++) {
        const f32x16 scaled_table = table * absmax[block];  /* c_q * absmax for all 16 q: one rounding each */
        for (int64_t byte = 0; byte < blocksize / 2; byte += 16) {
            const uint8_t *bytes = packed + block * (blocksize / 2) + byte;
            i32x16 q;
            for (int i = 0; i < 16; i++) q[i] = bytes[i];  /* widened to 32 bits, the shuffle's index width */
            const f32x16 high = __builtin_shuffle(scaled_table, q >> 4);   /* first value of each byte */
            const f32x16 low = __builtin_shuffle(scaled_table, q & 15);    /* second value */
            store16(__builtin_shuffle(high, low, first_half), dtype, dst);
            store16(__builtin_shuffle(high, low, second_half), dtype, dst + 16 * element_size);
            dst += 32 * element_size;
        }
    }
}

/* squeeze's int8 kernels for the mcu firmware: u8 x s8 -> s32 convolution and dense with ONNX Runtime's
 * requantization, called from model.c like TVM's kernels (the same packed-call signature).
 *
 * The scheme is CMSIS-NN's (arm_convolve_s8): for two output columns at a time, the input window of each is
 * copied once into an int16 column (im2col, x - zx, zero where the window leaves the image), then every pair of
 * output channels is computed against both columns with 4 accumulators. On a core with the DSP extension
 * (Cortex-M4/M7: __ARM_FEATURE_DSP) one 32-bit load brings 4 int8 weights, SXTB16 widens them into two pairs of
 * int16 and SMLAD multiplies and adds a pair in one instruction: 16 multiply-adds from 4 column loads, 2 weight
 * loads, 4 SXTB16 and 8 SMLAD. Elsewhere the same loops run in plain C (the results are identical).
 *
 * Weights come packed by squeeze (targets/mcu_int8.py): [O, KP] int8, KP = C*KH*KW rounded up to 4 (zero
 * tail), and in every group of 4 the bytes stored as w0 w2 w1 w3, so SXTB16 (bytes 0 and 2) gives (w0, w1) and
 * SXTB16 after a rotation by 8 gives (w2, w3): the pairs the int16 column holds in order.
 *
 * acc = bias + sum (x - zx) * w, exact in int32 (squeeze checks the bound). Requantize (ONNX Runtime's
 * QLinearConv / MLAS): y = saturate(round_half_even(float(acc) * multiplier) + zy). This file must be compiled
 * with -ffp-contract=off: a fused multiply-add would skip the rounding of the product that ONNX Runtime does.
 *
 * Arguments (DLTensor): x u8 [N, C, H, W]; w s8 [O, KP]; bias s32 [O]; multiplier f32 [O] (the scale sx*sw for a
 * float output); params s32 [PARAMS]; out u8 (requantize) or f32 [N, O, OH, OW]. A dense layer is a 1x1 conv on
 * a 1x1 image with N rows.
 */
#include <stdint.h>
#include <string.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/c_api.h>
#if defined(__ARM_FEATURE_DSP)
#include <arm_acle.h>
#endif

enum { P_N, P_C, P_H, P_W, P_O, P_OH, P_OW, P_KH, P_KW, P_SH, P_SW, P_PT, P_PL, P_DH, P_DW, P_ZX, P_ZY,
       P_REQUANTIZE, P_KP, PARAMS };

#ifndef SQUEEZE_IM2COL_BYTES
#define SQUEEZE_IM2COL_BYTES 64
#endif
/* two int16 columns of KP values: the largest layer's, sized by the build (-DSQUEEZE_IM2COL_BYTES) */
int16_t squeeze_im2col[SQUEEZE_IM2COL_BYTES / 2] __attribute__((aligned(4)));

static inline void* arg_data(void* args, int i) {
  return ((DLTensor*)((TVMFFIAny*)args)[i].v_ptr)->data;
}

static inline uint32_t load32(const void* p) {
  uint32_t v;
  memcpy(&v, p, 4); /* an unaligned LDR on Cortex-M3 and later */
  return v;
}

static inline uint8_t requantize(int32_t acc, float multiplier, int32_t zy) {
  float v = (float)acc * multiplier;
  if (v > 1.0e6f) v = 1.0e6f; /* the result saturates long before; keeps the rounding below exact */
  if (v < -1.0e6f) v = -1.0e6f;
  v = (v + 12582912.0f) - 12582912.0f; /* 1.5 * 2^23: rounds to an integer, ties to even (the FPU's mode) */
  int32_t q = (int32_t)v + zy;
  return (uint8_t)(q < 0 ? 0 : q > 255 ? 255 : q);
}

static void im2col(const uint8_t* x, const int32_t* p, int n, int oy, int ox, int16_t* col) {
  const int C = p[P_C], H = p[P_H], W = p[P_W], KH = p[P_KH], KW = p[P_KW], zx = p[P_ZX];
  const int y0 = oy * p[P_SH] - p[P_PT], x0 = ox * p[P_SW] - p[P_PL];
  const uint8_t* image = x + (size_t)n * C * H * W;
  int16_t* out = col;
  for (int c = 0; c < C; ++c) {
    const uint8_t* plane = image + (size_t)c * H * W;
    for (int ky = 0; ky < KH; ++ky) {
      const int iy = y0 + ky * p[P_DH];
      for (int kx = 0; kx < KW; ++kx) {
        const int ix = x0 + kx * p[P_DW];
        *out++ = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? (int16_t)(plane[iy * W + ix] - zx) : 0;
      }
    }
  }
  while (out < col + p[P_KP]) *out++ = 0;
}

/* acc[j][i] += weights row j (of 2) . column i (of `cols`, 1 or 2), over KP values */
static void dot(const int8_t* w0, const int8_t* w1, const int16_t* c0, const int16_t* c1, int kp, int32_t acc[2][2]) {
  int32_t a00 = acc[0][0], a01 = acc[0][1], a10 = acc[1][0], a11 = acc[1][1];
  for (int k = 0; k < kp; k += 4) {
#if defined(__ARM_FEATURE_DSP)
    const uint32_t u0 = load32(w0 + k), u1 = load32(w1 + k);
    const int32_t w0lo = __sxtb16(u0), w0hi = __sxtb16((u0 >> 8) | (u0 << 24));
    const int32_t w1lo = __sxtb16(u1), w1hi = __sxtb16((u1 >> 8) | (u1 << 24));
    const int32_t x0lo = (int32_t)load32(c0 + k), x0hi = (int32_t)load32(c0 + k + 2);
    const int32_t x1lo = (int32_t)load32(c1 + k), x1hi = (int32_t)load32(c1 + k + 2);
    a00 = __smlad(w0lo, x0lo, a00); a00 = __smlad(w0hi, x0hi, a00);
    a01 = __smlad(w0lo, x1lo, a01); a01 = __smlad(w0hi, x1hi, a01);
    a10 = __smlad(w1lo, x0lo, a10); a10 = __smlad(w1hi, x0hi, a10);
    a11 = __smlad(w1lo, x1lo, a11); a11 = __smlad(w1hi, x1hi, a11);
#else
    /* stored w0 w2 w1 w3: byte 1 pairs with column value 2, byte 2 with value 1 */
    static const int order[4] = {0, 2, 1, 3};
    for (int i = 0; i < 4; ++i) {
      const int32_t x0 = c0[k + order[i]], x1 = c1[k + order[i]];
      a00 += w0[k + i] * x0; a01 += w0[k + i] * x1;
      a10 += w1[k + i] * x0; a11 += w1[k + i] * x1;
    }
#endif
  }
  acc[0][0] = a00; acc[0][1] = a01; acc[1][0] = a10; acc[1][1] = a11;
}

static int32_t conv(void* args) {
  const uint8_t* x = (const uint8_t*)arg_data(args, 0);
  const int8_t* w = (const int8_t*)arg_data(args, 1);
  const int32_t* bias = (const int32_t*)arg_data(args, 2);
  const float* multiplier = (const float*)arg_data(args, 3);
  const int32_t* p = (const int32_t*)arg_data(args, 4);
  void* out = arg_data(args, 5);
  const int O = p[P_O], OH = p[P_OH], OW = p[P_OW], KP = p[P_KP], zy = p[P_ZY];
  if ((size_t)KP * 2 * sizeof(int16_t) > sizeof(squeeze_im2col)) return -1;
  int16_t* col0 = squeeze_im2col;
  int16_t* col1 = squeeze_im2col + KP;
  for (int n = 0; n < p[P_N]; ++n) {
    for (int oy = 0; oy < OH; ++oy) {
      for (int ox = 0; ox < OW; ox += 2) {
        const int cols = ox + 1 < OW ? 2 : 1;
        im2col(x, p, n, oy, ox, col0);
        if (cols == 2) im2col(x, p, n, oy, ox + 1, col1);
        for (int o = 0; o < O; o += 2) {
          const int rows = o + 1 < O ? 2 : 1;
          /* an odd last row or column is computed twice over the same data and written once */
          int32_t acc[2][2] = {{bias[o], bias[o]}, {bias[o + rows - 1], bias[o + rows - 1]}};
          dot(w + (size_t)o * KP, w + (size_t)(o + rows - 1) * KP, col0, cols == 2 ? col1 : col0, KP, acc);
          for (int j = 0; j < rows; ++j) {
            const size_t base = (((size_t)n * O + o + j) * OH + oy) * OW + ox;
            for (int i = 0; i < cols; ++i) {
              if (p[P_REQUANTIZE]) ((uint8_t*)out)[base + i] = requantize(acc[j][i], multiplier[o + j], zy);
              else ((float*)out)[base + i] = (float)acc[j][i] * multiplier[o + j];
            }
          }
        }
      }
    }
  }
  return 0;
}

int32_t __tvm_ffi_squeeze_conv2d_u8s8(void* self, void* args, int32_t num_args, void* result) {
  (void)self; (void)result;
  return num_args == 6 ? conv(args) : -1;
}

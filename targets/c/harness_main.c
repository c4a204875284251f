static char line[1024];
static int pos;
static void flush(void) { line[pos] = 0; squeeze_write(line); pos = 0; }
static void put(const char* s) { while (*s) { if (pos >= (int)sizeof(line) - 2) flush(); line[pos++] = *s++; } }
static void put_hex(uint32_t v) {
  static const char digits[] = "0123456789abcdef";
  char buf[10]; int n = 0;
  for (int k = 28; k >= 0; k -= 4) buf[n++] = digits[(v >> k) & 0xF];
  buf[n] = 0; put(buf);
}
static void put_u64(uint64_t v) {
  char buf[24]; int n = 23; buf[n] = 0;
  do { buf[--n] = (char)('0' + v % 10); v /= 10; } while (v);
  put(buf + n);
}

/* A loop of known length (2 instructions per iteration on Thumb-2: subs + bne) to turn counter ticks into
   instructions; only meaningful under QEMU -icount, where time advances per instruction. */
static uint64_t calibration(uint32_t iterations) {
#if CALIBRATE && defined(__thumb__)
  uint64_t t0 = squeeze_counter();
  __asm__ volatile("1: subs %0, %0, #1\n bne 1b" : "+r"(iterations) : : "cc");
  return squeeze_counter() - t0;
#else
  (void)iterations; return 0;
#endif
}

int main(void) {
  for (int s = 0; s < NUM_SAMPLES; ++s) {
    for (int i = 0; i < squeeze_num_inputs; ++i)
      memcpy(squeeze_inputs[i].data, samples[s][i], squeeze_inputs[i].nbytes);
    int rc = squeeze_model_run();
    if (rc != 0) {
      put("ERR kernel "); put(squeeze_kernel_names[rc - 1]); put(" failed\n"); flush();
      return 1;
    }
    for (int o = 0; o < squeeze_num_outputs; ++o) {
      put("OUT "); put_u64((uint64_t)s); put(" "); put_u64((uint64_t)o);
      const uint8_t* p = (const uint8_t*)squeeze_outputs[o].data;
      for (uint32_t k = 0; k + 4 <= squeeze_outputs[o].nbytes; k += 4) {
        uint32_t w; memcpy(&w, p + k, 4); put(" "); put_hex(w);
      }
      for (uint32_t k = squeeze_outputs[o].nbytes & ~3u; k < squeeze_outputs[o].nbytes; ++k) {
        put(" x"); put_hex(p[k]);
      }
      put("\n"); flush();
    }
  }
  for (int i = 0; i < squeeze_num_inputs; ++i) memcpy(squeeze_inputs[i].data, samples[0][i], squeeze_inputs[i].nbytes);
  uint64_t total = 0;
  for (int r = 0; r < TIMED_RUNS; ++r) {
    uint64_t t0 = squeeze_counter();
    squeeze_model_run();
    uint64_t t1 = squeeze_counter();
    total += t1 - t0;
    put("RUN "); put_u64(t1 - t0); put("\n");
  }
  put("TIME "); put_u64((uint64_t)TIMED_RUNS); put(" "); put_u64(total); put("\n");
  put("CALIB 1000000 "); put_u64(calibration(1000000u)); put("\n");
  put("WORKSPACE "); put_u64(squeeze_workspace_peak()); put("\n");
  put("STACK "); put_u64(squeeze_stack_used()); put("\n");
  put("DONE\n"); flush();
  return 0;
}

#ifndef SQUEEZE_MODEL_H
#define SQUEEZE_MODEL_H
#include <stdint.h>
typedef struct { void* data; uint32_t nbytes; } squeeze_io_t;
extern const squeeze_io_t squeeze_inputs[];
extern const squeeze_io_t squeeze_outputs[];
extern const int squeeze_num_inputs;
extern const int squeeze_num_outputs;
extern const char* const squeeze_kernel_names[];
int squeeze_model_run(void);
/* platform (startup.c on bare metal, runtime.c when hosted) */
void squeeze_write(const char* text);
void squeeze_exit(int code);
uint64_t squeeze_counter(void);
uint32_t squeeze_stack_used(void);
uint32_t squeeze_workspace_peak(void);
#endif

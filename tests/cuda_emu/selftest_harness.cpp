// The emulator's own test kernels (selftest_cuda.cu) behind a C interface for ctypes
// (tests/test_cuda_emulation.py). Returns null or the error.
#include "kernels.inc"

extern "C" const char* emu_selftest(int which, int blocks, int threads, void* out, int flag) {
  return selftest_launch(which, blocks, threads, out, flag);
}

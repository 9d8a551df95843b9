// Shared macros for kernel files: no torch headers here.
#pragma once

#if defined(__CUDACC__)
#define FL_HD __host__ __device__ __forceinline__
#define FL_DEVICE __device__ __forceinline__
#else
#define FL_HD inline
#define FL_DEVICE inline
#endif

// For small element functions and row loops called once per vector from a hot loop (and, under
// nvcc, callable from CUDA kernels too): GCC keeps some of them out of line otherwise (measured in the Dice kernels: a call per vector, with the
// vectors spilled, made the backward about 30% slower).
#if defined(__CUDACC__)
#define FL_INLINE __host__ __device__ __forceinline__
#else
#define FL_INLINE inline __attribute__((always_inline))
#endif

// Every file that is compiled more than once with different instruction sets (the generic
// and the AVX2 CPU kernels, the CUDA kernels) wraps its templates and inline functions in
// namespace fastloss::FL_ISA. Without it the linker may merge an AVX2-compiled copy of an
// inline function into the generic path and crash older CPUs with an illegal instruction.
#ifndef FL_ISA
#define FL_ISA generic
#endif

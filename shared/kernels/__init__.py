"""Optional accelerator kernels (Triton). Nothing here is imported by the rest of the package at import
time: callers load a kernel module lazily, only when it will actually run, so the CPU-only install never
needs triton."""

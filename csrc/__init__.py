"""C++/CUDA sources of the `cuda` ops backend, built by selfdistill.ops.cuda_ext (package data only)."""

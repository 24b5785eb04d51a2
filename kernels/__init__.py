"""gpupath device kernels (imported as ``gpupath_kernels``; this folder is ``kernels/`` in the repo).

Each module holds, for one stage: Numba CUDA kernels (compiled lazily, on first launch), a plain
NumPy twin that states what the kernel computes, and a public wrapper that validates, allocates
and launches on device arrays (CuPy) or runs the twin on host arrays. CI runs the kernels under
Numba's CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) on small inputs and compares them with the
twins; see README.md in this folder.
"""

__all__: list[str] = []

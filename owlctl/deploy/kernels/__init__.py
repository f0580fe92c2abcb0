"""owlctl's sparse CPU kernels: the C source (``owlsparse.c``), its safe build (``build``), the torch module
(``linear``: ``SparseLinear``, ``sparsify``) and the read-bandwidth probe (``probe``).

Importing this package is cheap (no torch); ``linear`` imports torch. The names below are shared by the
CLI help (owlctl.options.SparseKernel, kept equal by a test) and ``linear``.
"""

# Instruction-set variants of the C kernels, best first; "auto" picks the best the CPU runs.
ISAS = ("auto", "avx512vbmi2", "avx512", "avx2", "portable")
# Kernel names accepted by sparsify / bench --sparse-kernel ("csr" is the old portable kernel's name).
KERNELS = ("auto", "bitmask", *(f"bitmask-{isa}" for isa in ISAS[1:]), "csr", "torch-csr", "torch-bsr")

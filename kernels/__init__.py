"""quanteval_kernels: bit packing and dequant-matmul kernels (torch reference + Triton).

Imported as ``quanteval_kernels`` (Hugging Face publishes a package named
``kernels`` that transformers probes for, so this folder is mapped to its own
name in ``pyproject.toml``).

Not built yet: packed runtime and kernels are the subject of the kernels
issue. Today every method runs as fake-quant (``quanteval.methods.apply_result``).
"""

"""Torch-only building blocks below the model code: packed (quantized) linears, attention, tiling, kernels.

Imports torch (and Triton / gguf where a module needs them) and studio.errors, never studio.models or
studio.engine. Nothing is imported here, so `import studio.nn` stays cheap; import the module you need.
"""

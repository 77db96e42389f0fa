"""ilc: inter-layer KV-cache compression (PoD) for Hugging Face causal LMs.

`ilc calibrate` (this package) measures attention on sample text and writes a plan; `ilc.runtime` applies a
plan at serving time; `ilc.kernels` holds the Triton kernels the runtime uses on GPU.
"""

__version__ = "0.1.0"

"""ilc.kernels: Triton kernels for attention over the PoD cache layout (used by the runtime on CUDA)."""


def pod_attention_cuda(query, view, values, scaling):
    raise NotImplementedError("Triton kernels are not built yet")

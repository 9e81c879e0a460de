"""pagedattn: PagedAttention for PyTorch.

- :mod:`pagedattn.ops`: paged attention and KV-cache ops as ``torch.ops.pagedattn.*``.
- :mod:`pagedattn.alloc`: a standalone block allocator (no GPU code).
- :mod:`pagedattn.integrations`: Hugging Face transformers integration and the engine.
"""

__version__ = "0.1.0"

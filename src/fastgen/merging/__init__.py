"""``fastgen.merging``: token merging (ToMe) and token downsampling (ToDo) for diffusion denoisers.

Use it through ``fastgen.patch(pipe, tome=0.5)`` / ``todo=2`` (or ``fastgen.ToMeConfig`` /
``fastgen.ToDoConfig``). Here: the configs (``config``), the matching, merge and unmerge with their
fused Triton kernels and PyTorch references (``matching``, ``kernels/merging.py``), the per-model
state a patch keeps (``runtime``), and where merging goes in each architecture (``apply``; UNets in
``unet``, DiTs in ``dit``).
"""

from fastgen.merging.config import ToDoConfig, ToMeConfig

__all__ = ["ToDoConfig", "ToMeConfig"]

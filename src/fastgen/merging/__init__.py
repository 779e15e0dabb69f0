"""``fastgen.merging``: token merging (ToMe) and token downsampling (ToDo) for diffusion denoisers.

In progress (issue #12): the configs and the plain-PyTorch reference of the matching
(``fastgen.merging.matching``), equal to tomesd 0.1.3's after unmerge. The kernels and the
``fastgen.patch(pipe, tome=..., todo=...)`` integration come next; nothing here is applied to a
model yet.
"""

from fastgen.merging.config import ToDoConfig, ToMeConfig

__all__ = ["ToDoConfig", "ToMeConfig"]

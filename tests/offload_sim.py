"""Offloading as it looks from a model, without a GPU: parameters on the meta device except while
the hook that owns them runs. A forward that reads a weight outside its hook meets a meta tensor
and fails, which is what skipping an offload hook does on a GPU."""

from __future__ import annotations

import torch


class MetaParams:
    """Parameters ``names`` of ``module``: real while loaded, on the meta device otherwise.
    ``loads`` counts the loads."""

    def __init__(self, module, names):
        self.real = {n: module.get_parameter(n).detach().clone() for n in names}
        self.loads = 0

    def put(self, module, load: bool):
        for name, t in self.real.items():
            owner, _, leaf = name.rpartition(".")
            m = module.get_submodule(owner) if owner else module
            m._parameters[leaf] = torch.nn.Parameter(t if load else t.to("meta"), requires_grad=False)
        self.loads += load

"""Where token merging goes in each architecture: the hooks a patch registers for ToMe / ToDo."""

from __future__ import annotations

from fastgen._warnings import warn_once
from fastgen.merging.runtime import Merging


def merging_places(model, arch, state) -> tuple[Merging | None, list[tuple]]:
    """(``Merging``, [(module, hook)]) for ``model`` under ``state``'s config, or (None, []) when the
    config asks for no merging. Warns once when it asks for merging and nothing merges."""
    config = state.config
    if config.tome is None and config.todo is None:
        return None, []
    merging = Merging(model, config.tome, config.todo, state)
    if arch.name == "sd15/sdxl":
        from fastgen.merging.unet import unet_places

        places = unet_places(model, merging)
    elif arch.token_grid:
        from fastgen.merging.dit import dit_places

        places = dit_places(model, arch, merging)
    else:
        places = []
    asked = (config.tome is not None and config.tome.merges) or config.todo is not None
    if asked and not merging.rows:
        warn_once(f"merging-none:{type(model).__name__}:{config.tome}:{config.todo}",
                  f"fastgen.patch: tome={config.tome} todo={config.todo} merges nothing in {type(model).__name__}"
                  + (f" (its highest-resolution attention is at level {merging.first_level}: raise max_downsample)"
                     if arch.name == "sd15/sdxl" else ""))
    return merging, places

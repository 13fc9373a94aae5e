"""Saving a user-registered head's source beside a checkpoint's remote code.

`ViTSegForSemanticSegmentation.save_pretrained` calls `save_user_head_source` when it writes remote code: the
module file of a head class defined outside hf-vitseg is copied beside the modeling files, its `hf_vitseg`
imports rewritten to the flat sibling files, and it is imported from the saved `configuration_vitseg.py`, so
`from_pretrained(..., trust_remote_code=True)` works where neither hf-vitseg nor the user's module is installed.
"""

from __future__ import annotations

import inspect
import re
import shutil
import sys
import warnings
from pathlib import Path

# Names that user head modules may import from hf_vitseg, and the flat file that defines them.
_FLAT_HOMES = {
    "BaseHead": "head_base", "BackboneFeatures": "features", "register_head": "head_base",
    "list_heads": "head_base", "get_head_class": "head_base", "ConvNormAct": "head_base", "resize": "head_base",
}


def save_user_head_source(head_cls: type, directory: Path) -> None:
    """Copy the module defining `head_cls` into the checkpoint folder `directory`, if it is not hf-vitseg's own.

    Warns (and saves nothing) for a class defined in `__main__` or without a source file; raises `ValueError`
    if the module imports from hf_vitseg a name that cannot travel with the checkpoint (see `_FLAT_HOMES`).
    """
    module = sys.modules.get(head_cls.__module__)
    ours = __name__.rsplit(".", 1)[0]
    if head_cls.__module__.startswith(ours + ".") or module is None:
        return
    try:
        source_file = inspect.getsourcefile(module)
    except TypeError:
        source_file = None
    if head_cls.__module__ == "__main__" or source_file is None:
        warnings.warn(
            f"Head {head_cls.__qualname__} is defined in {head_cls.__module__!r}, not in a module file; it is not "
            "saved with the checkpoint, so loading with trust_remote_code=True where it is not registered fails. "
            "Define custom heads in a module file."
        )
        return
    flat_name = "vitseg_user_" + head_cls.__module__.replace(".", "_")
    text = Path(source_file).read_text()

    def rewrite(match: re.Match) -> str:
        module_path, names = match.group(1), match.group(2)
        if module_path.startswith("hf_vitseg.modeling."):
            return f"from .{module_path.rsplit('.', 1)[1]} import {names}"
        by_home: dict[str, list[str]] = {}
        for name in [n.strip() for n in names.strip("()").split(",") if n.strip()]:
            home = _FLAT_HOMES.get(name.split(" as ")[0].strip())
            if home is None:
                raise ValueError(
                    f"{source_file} imports {name!r} from {module_path}, which cannot travel with the checkpoint. "
                    f"Custom head modules may import {sorted(_FLAT_HOMES)} from hf_vitseg."
                )
            by_home.setdefault(home, []).append(name)
        return "\n".join(f"from .{home} import {', '.join(n)}" for home, n in by_home.items())

    text = re.sub(r"^from\s+(hf_vitseg[\w.]*)\s+import\s+(\([^)]*\)|[^\n]+)", rewrite, text, flags=re.MULTILINE)
    (directory / f"{flat_name}.py").write_text(text)
    config_file = directory / "configuration_vitseg.py"
    line = f"from .{flat_name} import *  # noqa: F401,F403  user head saved by hf-vitseg\n"
    content = config_file.read_text()
    if line not in content:
        config_file.write_text(content + "\n\n" + line)
    shutil.copymode(config_file, directory / f"{flat_name}.py")

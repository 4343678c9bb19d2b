"""The five vLLM refactors as runnable before/after code paths, one module per PR.

Each module defines ``EXPERIMENT``, ``TITLE`` and ``run(device, quick, preset) -> list[record]``.
``load_all`` imports them lazily; a module that fails to import is reported, not raised.
"""
from __future__ import annotations

import importlib
from types import ModuleType

MODULES = (
    "pr41300_router_gemm",
    "pr43746_mtp_norm",
    "pr43746_breakable_graphs",
    "pr43891_op_registration",
    "pr43905_mhc_direct",
    "pr44367_megamoe",
)


def load_all() -> list[tuple[str, ModuleType | None, str]]:
    """(name, module or None, reason) for every refactor module; missing ones say why."""
    out = []
    for name in MODULES:
        try:
            out.append((name, importlib.import_module(f"{__name__}.{name}"), ""))
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                out.append((name, None, "not implemented yet"))
            else:
                out.append((name, None, f"import failed: {e}"))
        except Exception as e:  # a broken module must not take the others down
            out.append((name, None, f"import failed: {type(e).__name__}: {e}"))
    return out

"""Test-only speed-up of Triton's interpreter; see ``patch_language_once_per_launch``.

The test processes (conftest.py) and the spawned distributed ranks (fsdp_worker.py) call it
once, after TRITON_INTERPRET is set and before any kernel runs.
"""
from __future__ import annotations

import inspect
import os


def patch_language_once_per_launch() -> None:
    """Triton's interpreter re-patches triton.language on every call of a @triton.jit helper
    inside a kernel (``InterpretedFunction.__call__``), scanning the module with
    ``inspect.getmembers`` each time: about 1.3 ms per call and a third of a quantized
    update's interpreted time. The launch already patched it (and restores it when the
    launch ends), so a helper's re-patch changes nothing; skip it when every language
    module the helper sees is already patched. ``TRITONADAM_TEST_STOCK_INTERPRETER=1``
    turns this off."""
    if os.environ.get("TRITON_INTERPRET") != "1" or os.environ.get("TRITONADAM_TEST_STOCK_INTERPRETER") == "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    scope_cls = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_cls is None or not tl.core.is_builtin(tl.load):
        return  # not the interpreter this was written against: leave it alone

    def patch_lang(fn):
        langs = [v for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(lang.load) for lang in langs):
            return scope_cls()  # already patched by the running launch
        return original(fn)

    interpreter._patch_lang = patch_lang

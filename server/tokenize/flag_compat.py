"""FlagEmbedding's tokenizing helpers, without importing the FlagEmbedding package.

The package's __init__ imports every model class (torch, datasets, peft, ...): 8 s in each tokenizer worker
against 3 s for the tokenizer alone. `tokenizer_compat.py` imports nothing of FlagEmbedding, so it is loaded from
its file; the instruction formatting (AbsReranker.get_detailed_inputs) is restated here and pinned to FlagEmbedding's
own by tests/test_tokenize.py.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType


def _load(relative: str, name: str) -> ModuleType:
    package = importlib.util.find_spec("FlagEmbedding")  # finds the package without running its __init__
    if package is None or package.origin is None:
        raise ImportError("FlagEmbedding is not installed")
    spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(package.origin), relative))
    if spec is None or spec.loader is None:
        raise ImportError(f"FlagEmbedding has no {relative}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_compat = _load(os.path.join("utils", "tokenizer_compat.py"), "server.tokenize._flag_tokenizer_compat")
prepare_for_model_compat = _compat.prepare_for_model_compat
pad_with_compat = _compat.pad_with_compat


def detailed_instruct(instruction_format: str, instruction: str | None, sentence: str) -> str:
    """AbsReranker.get_detailed_instruct, for a text with an instruction; the text itself without one."""
    if instruction is None:
        return sentence
    return instruction_format.replace("\\n", "\n").format(instruction, sentence)

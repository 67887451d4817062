"""Hugging Face adapters: apply pruning methods to transformers 5.x VLMs with hooks.

``tokenprune.prune(model, method)`` picks the adapter registered for ``model.config.model_type``
(registry ``tokenprune.registry.adapters``, entry-point group ``tokenprune.adapters``). A model
family is one module here: it defines the family's adapter classes and registers each under the
model type it handles with ``@registry.adapters.register("<model_type>")``. Importing this package
imports the family modules, which registers the built-ins; the documentation's family table is
generated from the registry (``tp.list_adapters()`` lists the same names at run time).

Importing this package does not import transformers.

Examples
--------
>>> import tokenprune as tp
>>> tp.get_adapter("llava_next").__name__
'LlavaNextAdapter'
>>> {"llava", "qwen2_5_vl", "gemma3"} <= set(tp.list_adapters())
True
"""

from .base import ModelAdapter, TokenLayout, VisionCropTokens, VisionRecord
from .lookup import get_model_adapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

__all__ = ["ModelAdapter", "TokenLayout", "VisionRecord", "VisionCropTokens", "get_model_adapter", "LlavaAdapter",
           "LlavaNextAdapter", "LlavaOnevisionAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Idefics3Adapter",
           "SmolVLMAdapter", "Gemma3Adapter"]

"""Hugging Face adapters: apply pruning methods to transformers 5.x VLMs with hooks.

``tokenprune.prune(model, method)`` picks the adapter registered for ``model.config.model_type``
(registry ``tokenprune.registry.adapters``, entry-point group ``tokenprune.adapters``). Built-ins:

========================  ==========================================================================
model type                adapter
========================  ==========================================================================
``llava``                 :class:`~tokenprune.adapters.llava.LlavaAdapter`
``llava_next``            :class:`~tokenprune.adapters.llava_next.LlavaNextAdapter`
``llava_onevision``       :class:`~tokenprune.adapters.llava_next.LlavaOnevisionAdapter`
``qwen2_vl``              :class:`~tokenprune.adapters.qwen2_vl.Qwen2VLAdapter`
``qwen2_5_vl``            :class:`~tokenprune.adapters.qwen2_vl.Qwen2_5_VLAdapter`
``idefics3``              :class:`~tokenprune.adapters.idefics3.Idefics3Adapter`
``smolvlm``               :class:`~tokenprune.adapters.idefics3.SmolVLMAdapter`
``gemma3``                :class:`~tokenprune.adapters.gemma3.Gemma3Adapter`
========================  ==========================================================================

Importing this package does not import transformers.
"""

from ..registry import adapters as _registry
from .base import ModelAdapter, TokenLayout, VisionRecord
from .lookup import get_model_adapter
from .gemma3 import Gemma3Adapter
from .idefics3 import Idefics3Adapter, SmolVLMAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter

_BUILTINS = {
    "llava": LlavaAdapter,
    "llava_next": LlavaNextAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
    "idefics3": Idefics3Adapter,
    "smolvlm": SmolVLMAdapter,
    "gemma3": Gemma3Adapter,
}

for _name, _cls in _BUILTINS.items():
    if _name not in _registry._entries:
        _registry.register(_name, _cls)

__all__ = ["ModelAdapter", "TokenLayout", "VisionRecord", "get_model_adapter", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "Qwen2VLAdapter",
           "Qwen2_5_VLAdapter", "Idefics3Adapter", "SmolVLMAdapter", "Gemma3Adapter"]

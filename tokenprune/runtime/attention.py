"""Attention signals without switching the model to eager attention.

transformers 5.x dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``.
We register, once per original implementation ``impl``, a function ``tokenprune_<impl>`` that first
lets a capture callback see the post-RoPE ``query`` and ``key`` of the modules we target, then calls
``impl`` unchanged (SDPA stays SDPA). The matching mask function is registered under the same name,
so masks are built exactly as for ``impl``. A pruning context switches only the sub-config that needs
it (the text model for text attention and key norms, the vision tower for [CLS] attention) and
restores the original name on exit. Registration itself is global and harmless: nothing uses the
new names unless a config points at them.

Only the needed query rows are computed: the [CLS] row in the vision tower, the text raters' rows at
one decoder layer, in float32, ``O(R · L · d)`` per head for ``R`` rows and ``L`` keys.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

PREFIX = "tokenprune_"

#: id(attention module) -> capture(module, query, key, attention_mask, kwargs). Filled and emptied by
#: pruning contexts; modules not in it pass straight through.
_TARGETS: dict[int, Callable] = {}


def _original_function(module, impl: str):
    if impl == "eager":
        mod = sys.modules.get(type(module).__module__)
        fn = getattr(mod, "eager_attention_forward", None)
        if fn is None:
            from transformers.models.llama.modeling_llama import eager_attention_forward as fn
        return fn
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS[impl]


def _make_wrapper(impl: str):
    def tokenprune_attention(module, query, key, value, attention_mask, **kwargs):
        capture = _TARGETS.get(id(module))
        if capture is not None:
            capture(module, query, key, attention_mask, kwargs)
        return _original_function(module, impl)(module, query, key, value, attention_mask, **kwargs)

    tokenprune_attention.__name__ = f"{PREFIX}{impl}"
    return tokenprune_attention


def wrapper_name(impl: str) -> str:
    """Register (once) and return the wrapper implementation name for ``impl`` (``"sdpa"``, ``"eager"``, ...).

    Raises
    ------
    UnsupportedModelError
        ``impl`` is flex attention (its mask is a ``BlockMask``, from which the wrapper cannot compute
        attention rows), or has no mask function we can reuse (e.g. a custom kernel).
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..errors import UnsupportedModelError

    if impl is None:
        impl = "eager"
    if impl.startswith(PREFIX):
        return impl
    if "flex_attention" in impl:
        raise UnsupportedModelError(f"attention implementation {impl!r}: flex attention is not supported by methods "
                                    "that read attention (its mask is a BlockMask); load the model with "
                                    "attn_implementation='sdpa' or 'eager'")
    name = f"{PREFIX}{impl}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        if impl not in ALL_MASK_ATTENTION_FUNCTIONS or (impl != "eager" and impl not in ALL_ATTENTION_FUNCTIONS):
            raise UnsupportedModelError(f"attention implementation {impl!r} cannot be wrapped to compute attention "
                                        "signals; use 'sdpa' or 'eager'")
        AttentionInterface.register(name, _make_wrapper(impl))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[impl])
    return name


def attention_rows(query: torch.Tensor, key: torch.Tensor, attention_mask, scaling, rows,
                   softcap=None, causal: bool = True) -> torch.Tensor:
    """Head-averaged attention probabilities of some query rows, as the attention kernel computes them.

    Parameters
    ----------
    query : torch.Tensor
        ``[B, H, Lq, d]`` post-RoPE queries (prefill: ``Lq == Lk``).
    key : torch.Tensor
        ``[B, Hkv, Lk, d]`` post-RoPE keys (grouped-query attention: ``H`` is a multiple of ``Hkv``).
    attention_mask : torch.Tensor or None
        The mask the kernel gets: ``[B|1, 1|H, Lq, Lk]`` bool (``True`` = attend) or additive float;
        ``None`` means no padding, causal if ``causal``.
    scaling : float or None
        Logit scale (``d ** -0.5`` if ``None``).
    rows : torch.Tensor or int
        long ``[B, R]``: query positions whose rows are computed; or one position (``0 <= rows < Lq``)
        for every sample, ``R = 1`` (read as views of ``query`` and the mask, no gather).
    softcap : float, optional
        Logit soft-capping ``c · tanh(x / c)`` (Gemma-2 style), if the module uses it.
    causal : bool
        With no mask, whether the module attends causally (SDPA's rule: the module's ``is_causal``,
        true for decoders, false for vision towers).

    Returns
    -------
    torch.Tensor
        float32 ``[B, R, Lk]``: softmax rows averaged over heads (rows with no allowed key are 0).

    Notes
    -----
    ``O(B · H · R · Lk · d)`` time, ``O(B · H · R · Lk)`` memory; never the full ``Lq × Lk`` map.
    """
    B, H, Lq, d = query.shape
    Lk = key.shape[2]
    if isinstance(rows, int):
        q = query[:, :, rows: rows + 1]
    else:
        rows = rows.clamp(0, Lq - 1)
        q = torch.gather(query, 2, rows[:, None, :, None].expand(B, H, rows.shape[1], d))
    q = q if q.dtype == torch.float32 else q.float()
    k = key if key.dtype == torch.float32 else key.float()
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d ** -0.5)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if attention_mask is None:  # every row allows its first key: no empty row
        one = isinstance(rows, int)
        if causal and not (one and rows >= Lk - 1):  # (a last row sees every key)
            limit = rows if one else rows[:, None, :, None]
            logits = logits.masked_fill(torch.arange(Lk, device=query.device)[None, None, None, :] > limit,
                                        float("-inf"))
        return torch.softmax(logits, dim=-1).mean(1)
    m = attention_mask
    if isinstance(rows, int):
        m = m[..., rows: rows + 1, :Lk]
    else:
        if m.shape[0] != B:
            m = m.expand(B, *m.shape[1:])
        m = torch.gather(m[..., :Lk], 2, rows[:, None, :, None].expand(B, m.shape[1], rows.shape[1], Lk))
    if m.dtype == torch.bool:
        logits = logits.masked_fill(~m, float("-inf"))
    else:
        logits = logits + m.float()
    probs = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0)
    return probs.mean(1)


def key_l1_norm(key: torch.Tensor) -> torch.Tensor:
    """float32 ``[B, Lk]``: L1 norm of each post-RoPE key, averaged over key/value heads (DART's pivots)."""
    return key.float().abs().sum(-1).mean(1)

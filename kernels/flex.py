"""CLEAR through FlexAttention with a block mask, as the CLEAR authors run it:
pooled keys appended after the sequence, a ``mask_mod`` with the CLEAR
pattern, the block mask built once per shape. The fallback when the Triton
kernel fails its first-use check, and the reference in bench/attention.py.
"""

import torch

_MASKS = {}
_COMPILED = {}


def clear_mask_mod(text_len, grid, window, seq_len):
    """mask_mod over keys ``[text | image | pooled]`` (pooled from ``seq_len`` on):
    text rows see text and image keys, image rows see text keys, their disc
    and every pooled key."""
    T, (_, w), r = text_len, grid, window

    def mask_mod(b, hh, q_idx, kv_idx):
        qi, ki = q_idx - T, kv_idx - T
        local = (qi // w - ki // w) ** 2 + (qi % w - ki % w) ** 2 < r * r
        text_row = (q_idx < T) & (kv_idx < seq_len)
        image_row = (q_idx >= T) & ((kv_idx < T) | (kv_idx >= seq_len) | local)
        return text_row | image_row

    return mask_mod


def clear_block_mask(text_len, grid, window, seq_len, kv_len, device, compiled=None):
    """The FlexAttention BlockMask for one shape, cached (FLUX reuses one shape
    in all 57 layers). ``compiled`` (default: on CUDA) builds it through
    torch.compile, which never materialises the L x L mask."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (text_len, tuple(grid), window, seq_len, kv_len, str(device))
    if key not in _MASKS:
        if len(_MASKS) >= 8:
            _MASKS.clear()
        compiled = torch.device(device).type == "cuda" if compiled is None else compiled
        build = _compiled("create_block_mask", create_block_mask) if compiled else create_block_mask
        _MASKS[key] = build(clear_mask_mod(text_len, grid, window, seq_len), None, None, seq_len, kv_len,
                            device=device)
    return _MASKS[key]


def _compiled(name, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def clear_attention_flex(q, k, v, *, text_len, grid, window, pooled_k=None, pooled_v=None, scale):
    """CLEAR attention on validated inputs through FlexAttention (compiled on
    CUDA, eager elsewhere: eager is exact but slow, for small shapes)."""
    import warnings

    from torch.nn.attention.flex_attention import flex_attention

    L = q.shape[2]
    if pooled_k is not None:
        k = torch.cat([k, pooled_k.to(k.dtype)], 2)
        v = torch.cat([v, pooled_v.to(v.dtype)], 2)
    block_mask = clear_block_mask(text_len, grid, window, L, k.shape[2], q.device)
    if q.device.type == "cuda":
        return _compiled("flex_attention", flex_attention)(q, k, v, block_mask=block_mask, scale=scale)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale)

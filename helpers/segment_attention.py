"""One attention call over many segments (taught in notebooks/12_packing.ipynb; used by
scripts/bench_3b.py).

Packed rows and the vision tower's windows share one problem: a long sequence cut into segments
(conversations, windows, images) that must not attend to each other. transformers 5.24 solves it
three ways, none of them fast on an sdpa GPU: the vision attention loops over windows in Python
(``Qwen2_5_VLVisionAttention.forward``: one small kernel per window, thousands per step), and a
packed text row gets a dense (T × T) block-diagonal mask, which computes every cross-segment score
before throwing it away. Flash attention's varlen kernel takes the boundaries (``cu_seqlens``)
and computes only the segments; this module gives one call that does that:

- ``segment_attention``: torch's ``varlen_attn`` on a GPU in bf16/fp16 when this torch has it,
  else one batched ``scaled_dot_product_attention`` over the segments padded to the longest
  (a key-padding mask keeps the padding out), causal or not.
- ``use_segment_attention(visual)``: the vision tower's blocks call it once per layer.
- ``register_text_attention()``: an attention implementation named ``"segment"`` for the language
  model, reading the boundaries from the packed row's text positions (``position_ids`` row 0).

Both are asserted equal to the library's own outputs in tests/test_segment_attention.py.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

NAME = "segment"
#: Which kernel served each kind of call last: "varlen" or "padded sdpa" (the benchmark records it).
BACKENDS: dict[str, str] = {}
#: Why torch's varlen kernel was given up in this process (then the padded path serves every call).
VARLEN_FAILED: list[str] = []


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _segments(cu_seqlens: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (S, Lmax), valid (S, Lmax)): row s lists the positions of segment s, padded with 0."""
    cu = cu_seqlens.to(torch.long)
    if cu.ndim != 1 or len(cu) < 2 or int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu.diff() <= 0).any()):
        raise ValueError(f"cu_seqlens={cu.tolist()}: expected 0 < … increasing … = {total} (the sequence length)")
    sizes = cu.diff()
    offsets = torch.arange(int(sizes.max()), device=cu.device)
    valid = offsets[None] < sizes[:, None]
    return torch.where(valid, cu[:-1, None] + offsets[None], 0), valid


def segment_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention inside each segment of ``cu_seqlens`` only; (total, heads, d) in and out, keys and
    values may have fewer heads (grouped-query attention). Mirrors flash attention's
    ``flash_attn_varlen_func`` (what transformers calls with ``cu_seq_lens_q``)."""
    total, heads, _ = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each kv head serves heads / kv_heads queries
        key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    kind = "causal" if causal else "full"
    varlen = _varlen()
    if varlen is not None and not VARLEN_FAILED and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
        cu = cu_seqlens.to(device=query.device, dtype=torch.int32)
        longest = int(cu.diff().max())
        try:
            out = varlen(query, key, value, cu, cu, longest, longest, is_causal=causal, scale=scale)
            BACKENDS[kind] = "varlen"
            return out
        except torch.OutOfMemoryError:
            raise
        except (TypeError, RuntimeError) as error:  # an older torch's signature or kernel limits
            VARLEN_FAILED.append(f"{type(error).__name__}: {error}")
    BACKENDS[kind] = "padded sdpa"
    index, valid = _segments(cu_seqlens.to(query.device), total)
    q, k, v = (t[index].transpose(1, 2) for t in (query, key, value))  # (S, heads, Lmax, d)
    mask = valid[:, None, None, :]
    if causal:
        mask = mask & torch.ones(index.shape[1], index.shape[1], dtype=torch.bool, device=mask.device).tril()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[valid]  # back to (total, heads, d), segment by segment = original order


# ---------------------------------------------------------------------------------------------
# The vision tower
# ---------------------------------------------------------------------------------------------


def _vision_attention_forward(self, hidden_states, cu_seqlens, position_embeddings=None, max_seqlen=None, **kwargs):
    """``Qwen2_5_VLVisionAttention.forward`` with one ``segment_attention`` call instead of the
    per-window loop (same qkv, rotary and projection: the module's own weights and functions)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
        apply_rotary_pos_emb_vision,
    )

    n = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(n, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    q, k = apply_rotary_pos_emb_vision(q, k, *position_embeddings)
    out = segment_attention(q, k, v, cu_seqlens, scale=self.scaling)
    return self.proj(out.reshape(n, -1))


def use_segment_attention(visual) -> None:
    """Make every block of the vision tower ``visual`` (``model.model.visual``) attend with one
    ``segment_attention`` call per layer (windows or whole images, as ``cu_seqlens`` says)."""
    if not hasattr(visual, "blocks"):
        raise TypeError(f"{type(visual).__name__} has no .blocks: expected model.model.visual of Qwen2.5-VL")
    for block in visual.blocks:
        block.attn.forward = types.MethodType(_vision_attention_forward, block.attn)


# ---------------------------------------------------------------------------------------------
# The language model
# ---------------------------------------------------------------------------------------------


def text_segment_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs
):
    """An ``AttentionInterface`` function: causal attention inside each packed conversation.

    ``query`` (1, heads, T, d); the conversations start where ``position_ids`` (the packed row's text
    positions, which the text model passes down) is 0. Returns (1, T, heads, d), as transformers'
    ``sdpa_attention_forward`` does."""
    if query.shape[0] != 1 or position_ids is None:
        raise ValueError(
            f"query batch {query.shape[0]}, position_ids {'missing' if position_ids is None else 'given'}: "
            "the 'segment' attention expects one packed row and its 4-row position ids"
        )
    starts = (position_ids[0] == 0).nonzero().flatten()
    cu = torch.cat([starts, torch.tensor([query.shape[2]], device=starts.device)])
    out = segment_attention(
        query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), cu, causal=True, scale=scaling
    )
    return out[None], None


def register_text_attention() -> str:
    """Register ``text_segment_attention`` as attention implementation ``"segment"`` (no mask is
    built for an implementation transformers does not know) and return the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, text_segment_attention)
    return NAME

"""Exact computation in chunks (no diffusers import): the same values, a smaller widest activation.

Two kinds of operator can be split without changing a single output:
* a row-wise network (linear, activation, linear: a transformer's feed-forward) over chunks of rows,
  each chunk's output written into one preallocated tensor;
* attention over chunks of queries: every query's softmax runs over all the keys either way, so a
  chunk of queries needs only its own rows of the score matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

try:
    from torch.nn.attention import SDPBackend

    _MATH = SDPBackend.MATH.value
except ImportError:  # older torch: no way to ask, so attention is never chunked
    _MATH = None


def feed_forward_chunk(rows: int, width: int, inner: int, chunk_tokens: int) -> int:
    """Rows per chunk: ``chunk_tokens``, or with 0 the most whose inner activation (rows x inner) is
    no larger than the input (rows x width)."""
    if chunk_tokens:
        return chunk_tokens
    return max(1, rows * width // max(inner, 1))


def rows_in_chunks(forward: Callable[..., torch.Tensor], hidden_states: torch.Tensor, chunk: int,
                   *args, **kwargs) -> torch.Tensor:
    """``forward(hidden_states)`` for a row-wise ``forward``, ``chunk`` rows at a time."""
    width = hidden_states.shape[-1]
    rows = hidden_states.numel() // width
    flat = hidden_states.reshape(rows, width)
    out = None
    for start in range(0, rows, chunk):
        piece = forward(flat[start:start + chunk], *args, **kwargs)
        if out is None:
            out = piece.new_empty((rows, piece.shape[-1]))
        out[start:start + piece.shape[0]] = piece
    return out.reshape(*hidden_states.shape[:-1], out.shape[-1])


def attention_chunk(query: torch.Tensor, key: torch.Tensor, chunk_tokens: int) -> int:
    """Queries per chunk: ``chunk_tokens``, or with 0 the most whose scores (queries x keys) are no
    larger than those queries (queries x head width)."""
    if chunk_tokens:
        return chunk_tokens
    return max(1, query.shape[-2] * query.shape[-1] // max(key.shape[-2], 1))


def query_chunk(chunk: int, length: int, is_causal: bool = False, dropout_p: float = 0.0) -> int:
    """Queries per chunk a call of ``length`` queries runs in: ``chunk``, or all of them where one
    chunk would hold them all or the call cannot be split (a causal mask or dropout's random numbers
    depend on the query's position)."""
    return length if chunk >= length or is_causal or dropout_p else chunk


def runs_on_math_path(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False) -> bool:
    """Whether PyTorch would run this attention on its math path, the one that holds the whole score
    matrix (flash, memory-efficient and CPU-flash kernels never do). False when it cannot say."""
    if _MATH is None or query.device.type == "meta":
        return False
    try:
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                         enable_gqa=enable_gqa)
    except (RuntimeError, TypeError, AttributeError):
        return False
    return choice == _MATH


def attention_in_query_chunks(chunk: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                              is_causal: bool = False, scale: float | None = None,
                              enable_gqa: bool = False) -> torch.Tensor:
    """``scaled_dot_product_attention`` over chunks of ``chunk`` queries (dimension -2), or whole
    where :func:`query_chunk` says so."""
    length = query.shape[-2]
    extra = {"scale": scale, "enable_gqa": enable_gqa} if enable_gqa else {"scale": scale}
    chunk = query_chunk(chunk, length, is_causal, dropout_p)
    if chunk == length:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal, **extra)
    per_query_mask = attn_mask is not None and attn_mask.dim() >= 2 and attn_mask.shape[-2] == length
    out = None
    for start in range(0, length, chunk):
        mask = attn_mask[..., start:start + chunk, :] if per_query_mask else attn_mask
        piece = F.scaled_dot_product_attention(query[..., start:start + chunk, :], key, value, mask, **extra)
        if out is None:
            out = piece.new_empty((*piece.shape[:-2], length, piece.shape[-1]))
        out[..., start:start + piece.shape[-2], :] = piece
    return out

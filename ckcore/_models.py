"""Shapes of reference models, torch-free, for benchmarks and the CLI demo.

The ``layout`` and ``model-load`` benchmarks and the ``ckcore plan`` demo all
plan a 70B-class transformer; this module is the one place its state dict is
described, so every workload plans the same tensors. Private: the lead's
benchmarks and CLI import it directly.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "LLAMA70B_DTYPE",
    "llama70b_state_dict_shapes",
    "llama_fsdp_tp_placements",
]

#: dtype of every Llama-2-70B parameter, by ckcore name.
LLAMA70B_DTYPE = "bfloat16"

# Llama-2-70B hyper-parameters (Meta's params.json): grouped-query attention
# with 8 KV heads of 128, so wk/wv are (8 * 128) x 8192.
_DIM = 8192
_N_LAYERS = 80
_N_HEADS = 64
_N_KV_HEADS = 8
_FFN_DIM = 28672
_VOCAB = 32000


def llama70b_state_dict_shapes(n_layers: int = _N_LAYERS) -> dict[str, tuple[int, ...]]:
    """Global shape of every tensor of Llama-2-70B by fqn (Meta's naming), in state-dict order.

    80 layers x (wq, wk, wv, wo, w1, w2, w3, attention_norm, ffn_norm) plus
    ``tok_embeddings``, ``norm`` and ``output``: 723 tensors, 69.0e9
    parameters, all :data:`LLAMA70B_DTYPE`. ``n_layers`` shortens the model
    (quick benchmark runs) without changing any shape.
    """
    head_dim = _DIM // _N_HEADS
    kv_dim = _N_KV_HEADS * head_dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (_VOCAB, _DIM)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes[p + "attention.wq.weight"] = (_DIM, _DIM)
        shapes[p + "attention.wk.weight"] = (kv_dim, _DIM)
        shapes[p + "attention.wv.weight"] = (kv_dim, _DIM)
        shapes[p + "attention.wo.weight"] = (_DIM, _DIM)
        shapes[p + "feed_forward.w1.weight"] = (_FFN_DIM, _DIM)
        shapes[p + "feed_forward.w2.weight"] = (_DIM, _FFN_DIM)
        shapes[p + "feed_forward.w3.weight"] = (_FFN_DIM, _DIM)
        shapes[p + "attention_norm.weight"] = (_DIM,)
        shapes[p + "ffn_norm.weight"] = (_DIM,)
    shapes["norm.weight"] = (_DIM,)
    shapes["output.weight"] = (_VOCAB, _DIM)
    return shapes


# Tensor-parallel style per weight (torchtitan's Llama plan): column-parallel
# weights and the embedding/output are split on dim 0, row-parallel ones on
# dim 1, norms are replicated.
_ROWWISE = ("attention.wo.weight", "feed_forward.w2.weight")
_COLWISE = (
    "attention.wq.weight",
    "attention.wk.weight",
    "attention.wv.weight",
    "feed_forward.w1.weight",
    "feed_forward.w3.weight",
    "tok_embeddings.weight",
    "output.weight",
)


def llama_fsdp_tp_placements(
    fqn: str, tp: int, replicate: bool = False
) -> tuple[Any, ...]:
    """Placements of one weight under FSDP2 x TP (optionally HSDP), as torch builds them.

    Mesh dims are ``(dp_shard, tp)``, or ``(dp_replicate, dp_shard, tp)``
    with ``replicate=True``. TP shards dim 0 (column-parallel, embedding,
    output) or dim 1 (row-parallel) or replicates (norms); FSDP2 then shards
    dim 0 over ``dp_shard``, as a ``_StridedShard(0, split_factor=tp)`` when
    TP already split dim 0 (FSDP2's right-to-left sharding). Returns
    :mod:`ckcore.layout` placements.
    """
    from ckcore.layout import Replicate, Shard, StridedShard

    if fqn.endswith(_COLWISE):
        places: tuple[Any, ...] = (StridedShard(0, tp), Shard(0))
    elif fqn.endswith(_ROWWISE):
        places = (Shard(0), Shard(1))
    else:
        places = (Shard(0), Replicate())
    return ((Replicate(),) if replicate else ()) + places

"""Contrastive losses for query-product retrieval.

The training objective of the paper is the symmetric NT-Xent (InfoNCE) loss with in-batch negatives:
for a batch of B (query, product) pairs, each query must pick its product among all B products and each
product its query among all B queries. Logits are cosine similarities times `scale = 1 / temperature`.
"""

import warnings

import torch
import torch.nn.functional as F
from torch import nn


def _is_distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and (
        torch.distributed.get_world_size() > 1
    )


def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gathers `tensor` along dim 0 from every process, keeping gradients.

    Returns the global tensor and the row offset of this process's rows in it. Outside a multi-process
    run it returns the tensor itself and offset 0. `torch.distributed.nn.functional.all_gather` is used
    because it back-propagates into every process's rows (accelerate's `gather` does not). Every process
    must call it with the same number of rows; a mismatch raises instead of hanging.
    """
    if not _is_distributed():
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    sizes = [torch.zeros((), dtype=torch.long, device=tensor.device) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(sizes, torch.tensor(tensor.shape[0], device=tensor.device))
    if len({int(size) for size in sizes}) != 1:
        raise ValueError(
            "Every process must contribute the same number of rows to the contrastive loss "
            f"(got {[int(s) for s in sizes]}); use `drop_last=True` and the same number of hard negatives."
        )
    rank = torch.distributed.get_rank()
    if tensor.shape[0] == 0:
        return tensor, 0
    with warnings.catch_warnings():
        # torch 2.13 marks this autograd-aware gather deprecated in favour of functional collectives that
        # do not yet back-propagate across processes the same way; it is still the correct tool here.
        warnings.simplefilter("ignore", FutureWarning)
        gathered = all_gather(tensor)
    return torch.cat(gathered, dim=0), rank * tensor.shape[0]


def contrastive_cross_entropy(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    scale: torch.Tensor | float,
    label_offset: int = 0,
    ignore_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One direction of NT-Xent: anchor i must pick candidate `label_offset + i` among all candidates.

    Both inputs are L2-normalised, so `anchors @ candidates.T` are cosine similarities; `scale` is
    `1 / temperature`. `ignore_mask` (bool, shaped like the logits) removes candidates that are known to
    be relevant too (false negatives) from the softmax; an anchor's own positive is never removed.
    Returns `(loss, logits)` with logits of shape `(len(anchors), len(candidates))`.

    Example:
    ```python
    >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> loss, logits = contrastive_cross_entropy(q, q, scale=20.0)
    >>> logits.shape
    torch.Size([4, 4])
    ```
    """
    if candidates.shape[0] < label_offset + anchors.shape[0]:
        raise ValueError(
            f"Need a positive candidate for every anchor: got {anchors.shape[0]} anchors (offset {label_offset}) "
            f"and {candidates.shape[0]} candidates."
        )
    logits = scale * anchors @ candidates.t()
    labels = torch.arange(anchors.shape[0], device=anchors.device) + label_offset
    if ignore_mask is None:
        return F.cross_entropy(logits, labels), logits
    ignore_mask = ignore_mask.clone()
    ignore_mask[torch.arange(anchors.shape[0], device=anchors.device), labels] = False
    return F.cross_entropy(logits.masked_fill(ignore_mask, float("-inf")), labels), logits


def _global_false_negative_masks(
    local_mask: torch.Tensor,
    num_queries: int,
    num_global_positives: int,
    num_candidates: int,
    positive_offset: int,
    query_offset: int,
    num_global_queries: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Places a per-process `(B, local products)` mask into the global candidate layout
    `[all positives ; all hard negatives]`; other processes' products are never masked (not known here)."""
    local_negatives = local_mask.shape[1] - num_queries
    rank = positive_offset // num_queries
    query_mask = local_mask.new_zeros((num_queries, num_candidates))
    query_mask[:, positive_offset : positive_offset + num_queries] = local_mask[:, :num_queries]
    if local_negatives:
        start = num_global_positives + rank * local_negatives
        query_mask[:, start : start + local_negatives] = local_mask[:, num_queries:]
    product_mask = local_mask.new_zeros((num_queries, num_global_queries))
    product_mask[:, query_offset : query_offset + num_queries] = local_mask[:, :num_queries].t()
    return query_mask, product_mask


class NTXentLoss(nn.Module):
    """Symmetric NT-Xent (InfoNCE) loss with in-batch negatives and optional hard negatives.

    `scale = 1 / temperature` multiplies the cosine similarities; the model owns it (learned or fixed)
    and passes it in. Under multi-process training with `gather_across_processes=True` every process
    scores its queries against the products of the global batch (and its products against the global
    queries), with gradients flowing through the gather, as open_clip and sentence-transformers do.

    Example:
    ```python
    >>> loss_fn = NTXentLoss()
    >>> q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    >>> p = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)  # 4 positives + 2 hard negatives
    >>> loss, logits = loss_fn(q, p, scale=torch.tensor(20.0))
    >>> loss_fn
    NTXentLoss(symmetric=True, gather_across_processes=True)
    ```
    """

    def __init__(self, symmetric: bool = True, gather_across_processes: bool = True):
        super().__init__()
        self.symmetric = symmetric
        self.gather_across_processes = gather_across_processes

    def forward(
        self,
        query_embeds: torch.Tensor,
        product_embeds: torch.Tensor,
        scale: torch.Tensor | float,
        false_negative_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`false_negative_mask[i, j]` (bool, `(num_queries, num_products)`, this process's products) marks
        products that also satisfy query i; they are left out of both softmaxes instead of being pushed away."""
        num_queries = query_embeds.shape[0]
        positives, hard_negatives = product_embeds[:num_queries], product_embeds[num_queries:]
        if self.gather_across_processes:
            global_queries, query_offset = gather_with_grad(query_embeds)
            global_positives, positive_offset = gather_with_grad(positives)
            global_negatives = gather_with_grad(hard_negatives)[0]
        else:
            global_queries, query_offset = query_embeds, 0
            global_positives, positive_offset = positives, 0
            global_negatives = hard_negatives
        candidates = torch.cat([global_positives, global_negatives], dim=0)
        query_mask = product_mask = None
        if false_negative_mask is not None:
            query_mask, product_mask = _global_false_negative_masks(
                false_negative_mask, num_queries, global_positives.shape[0], candidates.shape[0],
                positive_offset, query_offset, global_queries.shape[0],
            )
        query_loss, logits_per_query = contrastive_cross_entropy(
            query_embeds, candidates, scale, positive_offset, query_mask
        )
        if not self.symmetric:
            return query_loss, logits_per_query
        product_loss, _ = contrastive_cross_entropy(positives, global_queries, scale, query_offset, product_mask)
        return (query_loss + product_loss) / 2, logits_per_query

    def get_config_dict(self) -> dict:
        return {"symmetric": self.symmetric, "gather_across_processes": self.gather_across_processes}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value}" for key, value in self.get_config_dict().items())

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.extra_repr()})"


__all__ = ["NTXentLoss", "contrastive_cross_entropy", "gather_with_grad"]

"""GradCache: contrastive training steps with batches larger than the accelerator memory allows.

In-batch negatives make the NT-Xent loss better with larger batches, but the activations of every tower
for the whole batch must be held for the backward pass. GradCache (Gao et al., 2021, "Scaling Deep
Contrastive Learning Batch Size under Memory Limited Setup") removes that limit while computing exactly
the same gradients:

1. embed queries and products in chunks of `mini_batch_size` rows without autograd;
2. compute the full-batch loss on leaf copies of the concatenated embeddings and back-propagate it, which
   yields d loss / d embedding for every row (and the gradient of the logit scale);
3. re-embed every chunk with autograd and back-propagate its cached embedding gradients into the towers.

Only one chunk's activations are alive at a time. Dropout draws the same masks in steps 1 and 3 because
each chunk's random-number state is captured in step 1 and replayed in step 3.
"""

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

# Batch keys of `MultimodalRetrievalModel.forward` that belong to the product side without a `product_` prefix.
PRODUCT_IMAGE_KEYS = ("pixel_values", "image_mask", "image_features")
# Batch keys read by the loss, not by either tower.
LOSS_KEYS = ("false_negative_mask",)


def split_model_inputs(batch: dict) -> tuple[dict, dict]:
    """Splits a `model.forward` batch into keyword arguments of `get_query_embeddings` and `get_product_embeddings`.

    `query_*` keys lose their prefix, `product_*` keys theirs; `pixel_values`, `image_mask` and
    `image_features` belong to the products. `None` values are dropped.

    Example:
    ```python
    >>> queries, products = split_model_inputs({"query_input_ids": q, "product_input_ids": p, "image_mask": m})
    >>> sorted(queries), sorted(products)
    (['input_ids'], ['image_mask', 'input_ids'])
    ```
    """
    query_inputs, product_inputs, unknown = {}, {}, []
    for key, value in batch.items():
        if value is None:
            continue
        if key.startswith("query_"):
            query_inputs[key.removeprefix("query_")] = value
        elif key.startswith("product_"):
            product_inputs[key.removeprefix("product_")] = value
        elif key in PRODUCT_IMAGE_KEYS:
            product_inputs[key] = value
        elif key in LOSS_KEYS:
            continue
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"Unexpected batch keys {unknown}: a contrastive batch holds `query_*`, `product_*` and {list(PRODUCT_IMAGE_KEYS)}."
        )
    for side, inputs in (("query", query_inputs), ("product", product_inputs)):
        if "input_ids" not in inputs:
            raise ValueError(f"The batch has no `{side}_input_ids`.")
    return query_inputs, product_inputs


def chunk_rows(inputs: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Splits every tensor of `inputs` along its first dimension into chunks of at most `chunk_size` rows."""
    num_rows = inputs["input_ids"].shape[0]
    mismatched = {key: value.shape[0] for key, value in inputs.items() if value.shape[0] != num_rows}
    if mismatched:
        raise ValueError(f"Every input must have {num_rows} rows like `input_ids`; got {mismatched}.")
    return [
        {key: value[start : start + chunk_size] for key, value in inputs.items()}
        for start in range(0, num_rows, chunk_size)
    ]


class RandomStateSnapshot:
    """The random-number state (CPU and the accelerators holding `tensors`) at creation, replayable later.

    Replaying it around a forward pass makes dropout draw the same masks as a pass run right after the
    snapshot was taken, like GradCache's `RandContext` or `torch.utils.checkpoint`. The state outside
    `replay()` is left untouched.

    Example:
    ```python
    >>> snapshot = RandomStateSnapshot([])
    >>> first = torch.rand(2)
    >>> with snapshot.replay():
    ...     again = torch.rand(2)
    >>> torch.equal(first, again)
    True
    ```
    """

    def __init__(self, tensors: Iterable[torch.Tensor]):
        accelerator_devices = {t.device for t in tensors if t.device.type not in ("cpu", "meta")}
        device_types = {device.type for device in accelerator_devices}
        if len(device_types) > 1:
            raise ValueError(
                f"Tensors span several accelerator types {sorted(device_types)}; cannot snapshot them together."
            )
        self.device_type = device_types.pop() if device_types else None
        self.device_indices = sorted({device.index or 0 for device in accelerator_devices})
        self.cpu_state = torch.get_rng_state()
        device_module = torch.get_device_module(self.device_type) if self.device_type else None
        self.device_states = [device_module.get_rng_state(index) for index in self.device_indices]

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        # torch before 2.13 rejects device_type=None; left out, it only forks the CPU state for `devices=[]`.
        accelerator = {"device_type": self.device_type} if self.device_type else {}
        with torch.random.fork_rng(devices=self.device_indices, **accelerator):
            torch.set_rng_state(self.cpu_state)
            if self.device_type:
                device_module = torch.get_device_module(self.device_type)
                for index, state in zip(self.device_indices, self.device_states):
                    device_module.set_rng_state(state, index)
            yield


def average_gradients_across_processes(parameters: Iterable[nn.Parameter], process_group=None) -> None:
    """Averages the `.grad` of `parameters` over the processes of `process_group`, as DDP's reducer does.

    One all-reduce per (device, dtype) group. A parameter without a gradient on this process contributes
    zeros; one without a gradient on every process keeps `grad=None` (so optimizers still skip it). Every
    process must pass the same parameters in the same order.
    """
    world_size = torch.distributed.get_world_size(process_group)
    groups: dict[tuple, list[nn.Parameter]] = {}
    for parameter in parameters:
        if parameter.requires_grad:
            groups.setdefault((parameter.device, parameter.dtype), []).append(parameter)
    for group in groups.values():
        # The "has a gradient" flags ride in the same buffer, so processes agree on which grads to set.
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in group]
        has_grad = torch.tensor([p.grad is not None for p in group], dtype=group[0].dtype, device=group[0].device)
        flat = torch.cat([grad.reshape(-1) for grad in grads] + [has_grad])
        torch.distributed.all_reduce(flat, group=process_group)
        flat /= world_size
        num_values = flat.numel() - len(group)
        some_process_has_grad = (flat[num_values:] > 0).tolist()
        starts = itertools.accumulate([p.numel() for p in group], initial=0)
        for parameter, start, reduce_into in zip(group, starts, some_process_has_grad):
            reduced = flat[start : start + parameter.numel()].view_as(parameter)
            if parameter.grad is not None:
                parameter.grad.copy_(reduced)
            elif reduce_into:
                parameter.grad = reduced.clone()


def _unwrap(model: nn.Module) -> tuple[nn.Module, DistributedDataParallel | None]:
    if isinstance(model, DistributedDataParallel):
        return model.module, model
    if hasattr(model, "module"):
        raise TypeError(
            f"cached_contrastive_step supports plain models and DistributedDataParallel, not {type(model).__name__} "
            "(DeepSpeed, FSDP and DataParallel manage gradients themselves)."
        )
    return model, None


def _cache_frozen_image_features(model: nn.Module, product_chunk: dict) -> dict:
    """Runs a frozen image tower once: its features need no second pass in the gradient step. Under LiT
    (`train_dual_text_tower`) the features include trained projections, so they are not frozen."""
    if "pixel_values" not in product_chunk or "image_features" in product_chunk:
        return product_chunk
    if getattr(model, "image_tower", None) is None or not model.image_features_are_frozen:
        return product_chunk
    cached = dict(product_chunk)
    cached["image_features"] = model.get_image_features(cached.pop("pixel_values"), cached.get("image_mask"))
    return cached


def _default_backward(loss: torch.Tensor) -> None:
    loss.backward()


def _check_mini_batch_size(mini_batch_size) -> None:
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"`mini_batch_size` must be a positive integer, got {mini_batch_size!r}.")


def cached_contrastive_step(
    model: nn.Module,
    batch: dict,
    mini_batch_size: int,
    backward: Callable[[torch.Tensor], None] | None = None,
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> torch.Tensor:
    r"""
    One GradCache step: accumulates into `.grad` the gradients of `model(**batch).loss`, chunk by chunk.

    The gradients equal those of the plain `model(**batch).loss.backward()` (up to float rounding) while
    only `mini_batch_size` rows go through the towers with autograd at a time. The optimizer step and
    `zero_grad` stay with the caller. Returns the detached full-batch loss.

    Args:
        model: a `MultimodalRetrievalModel`, or one wrapped in `DistributedDataParallel` (as
            `accelerator.prepare` does for multi-process runs).
        batch: the inputs of `model.forward` (`query_*`, `product_*`, `pixel_values`, `image_mask`,
            `image_features`); products are the positives followed by any hard negatives.
        mini_batch_size: rows embedded at once, for queries and products alike (the last chunk may be smaller).
        backward: called once with the full-batch loss, e.g. `accelerator.backward` so that loss scaling
            (fp16) and gradient-accumulation division apply. The cached embedding gradients carry that
            scaling into the towers, which is why the chunk passes use plain `torch.autograd.backward`.
        autocast: a zero-argument context-manager factory wrapped around every forward computation, e.g.
            `accelerator.autocast` under mixed precision (the towers are called directly, so the autocast
            that `accelerator.prepare` puts on `model.forward` does not apply).

    Multi-process training: the loss gathers the embeddings of every process (with gradients), so step 2
    runs collectives and must be called on every process. With a DDP-wrapped model the towers are run
    through `model.module`, which leaves DDP's reducer idle (its hooks only fire after a `DDP.forward`);
    the gradients are instead averaged with one all-reduce per step after the last chunk. Inside
    `model.no_sync()` (e.g. the non-final micro-steps of `accelerator.accumulate`) that all-reduce is
    skipped, as DDP would. DDP's buffer broadcast is skipped as well (the towers have no batch-norm
    statistics to keep in sync).

    Example:
    ```python
    >>> loss = cached_contrastive_step(model, batch, mini_batch_size=32, backward=accelerator.backward)
    >>> optimizer.step()
    >>> optimizer.zero_grad()
    ```
    """
    _check_mini_batch_size(mini_batch_size)
    backward = backward or _default_backward
    autocast = autocast or contextlib.nullcontext
    module, ddp = _unwrap(model)
    query_inputs, product_inputs = split_model_inputs(batch)
    rng_tensors = [next(module.parameters())]
    with torch.no_grad(), autocast():
        product_chunks = [
            _cache_frozen_image_features(module, chunk) for chunk in chunk_rows(product_inputs, mini_batch_size)
        ]
    sides = {
        "query": (module.get_query_embeddings, chunk_rows(query_inputs, mini_batch_size)),
        "product": (module.get_product_embeddings, product_chunks),
    }

    # 1. Embeddings without autograd, remembering each chunk's random state for the replay.
    snapshots, leaves = {}, {}
    with torch.no_grad():
        for side, (embed, chunks) in sides.items():
            snapshots[side], embeddings = [], []
            for chunk in chunks:
                snapshots[side].append(RandomStateSnapshot(rng_tensors + list(chunk.values())))
                with autocast():
                    embeddings.append(embed(**chunk))
            leaves[side] = torch.cat(embeddings).requires_grad_()

    # 2. Full-batch loss on leaf copies: gradients with respect to every embedding row (and the logit scale).
    with autocast():
        loss = module.score(
            leaves["query"], leaves["product"], return_loss=True, false_negative_mask=batch.get("false_negative_mask")
        ).loss
    backward(loss)
    if any(leaf.grad is None for leaf in leaves.values()):
        raise RuntimeError(
            "`backward(loss)` did not reach the embeddings; it must back-propagate the loss it is given."
        )

    # 3. Re-embed each chunk with autograd and push its cached gradient into the towers.
    for side, (embed, chunks) in sides.items():
        for chunk, snapshot, grad in zip(chunks, snapshots[side], leaves[side].grad.split(mini_batch_size)):
            with snapshot.replay(), autocast():
                embeddings = embed(**chunk)
            if embeddings.requires_grad:
                torch.autograd.backward(embeddings, grad)

    if ddp is not None and ddp.require_backward_grad_sync:
        average_gradients_across_processes(module.parameters(), ddp.process_group)
    return loss.detach()


class CachedNTXentStep:
    r"""
    A configured GradCache step for the NT-Xent loss: `step(model, batch)` runs [`cached_contrastive_step`].

    Example:
    ```python
    >>> step = CachedNTXentStep(mini_batch_size=32, backward=accelerator.backward, autocast=accelerator.autocast)
    >>> step
    CachedNTXentStep(mini_batch_size=32)
    >>> for batch in loader:
    ...     loss = step(model, batch)
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    ```
    """

    def __init__(
        self,
        mini_batch_size: int,
        backward: Callable[[torch.Tensor], None] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
    ):
        _check_mini_batch_size(mini_batch_size)
        self.mini_batch_size = mini_batch_size
        self.backward = backward
        self.autocast = autocast

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return cached_contrastive_step(
            model, batch, self.mini_batch_size, backward=self.backward, autocast=self.autocast
        )

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(mini_batch_size={self.mini_batch_size})"


__all__ = [
    "CachedNTXentStep",
    "RandomStateSnapshot",
    "average_gradients_across_processes",
    "cached_contrastive_step",
    "chunk_rows",
    "split_model_inputs",
]

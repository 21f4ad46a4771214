"""GradCache as a loss: the NT-Xent loss of batches larger than the accelerator memory allows.

In-batch negatives make the NT-Xent loss better with larger batches, but the activations of every tower for the
whole batch must be held for the backward pass. GradCache (Gao et al., 2021) removes that limit while computing
the same gradients; `CachedNTXentLoss` packages it as a loss, as sentence-transformers'
`CachedMultipleNegativesRankingLoss` does, so a training step reads like any other:

```python
>>> loss_fn = CachedNTXentLoss(mini_batch_size=32)
>>> with accelerator.autocast():
...     loss = loss_fn(model, batch)
>>> accelerator.backward(loss)
```
"""

import contextlib
import functools
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..processing_mmretrieval import split_model_inputs


def chunk_rows(inputs: dict[str, torch.Tensor], chunk_size: int) -> list[dict[str, torch.Tensor]]:
    """Splits every tensor of `inputs` along its first dimension into chunks of at most `chunk_size` rows.

    Example:
    ```python
    >>> [len(chunk["input_ids"]) for chunk in chunk_rows({"input_ids": torch.zeros(10, 4)}, 4)]
    [4, 4, 2]
    ```
    """
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


@dataclass(frozen=True)
class AutocastState:
    """The autocast setting of one device type (enabled, dtype) when captured, re-enterable later.

    Autocast is thread-local, and the backward pass may run in another thread (the autograd engine's, on CUDA)
    outside the caller's `with autocast():` block: re-entering the captured state keeps every forward of a
    step in the precision the caller chose.

    Example:
    ```python
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     state = AutocastState.capture("cpu")
    >>> with state.enter():
    ...     (torch.ones(2, 2) @ torch.ones(2, 2)).dtype
    torch.bfloat16
    ```
    """

    device_type: str
    dtype: torch.dtype
    enabled: bool

    @classmethod
    def capture(cls, device_type: str) -> "AutocastState":
        return cls(device_type, torch.get_autocast_dtype(device_type), torch.is_autocast_enabled(device_type))

    def enter(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def average_gradients_across_processes(parameters: Iterable[nn.Parameter], process_group=None) -> None:
    """Averages the `.grad` of `parameters` over the processes of `process_group`, as DDP's reducer does.

    One all-reduce per (device, dtype) group. A parameter without a gradient on this process contributes
    zeros; one without a gradient on every process keeps `grad=None` (so optimizers still skip it). Every
    process must pass the same parameters in the same order.

    Example:
    ```python
    >>> average_gradients_across_processes(model.parameters())  # on every process, after the backward
    ```
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
            f"CachedNTXentLoss supports plain models and DistributedDataParallel, not {type(model).__name__} "
            "(DeepSpeed, FSDP and DataParallel manage gradients themselves)."
        )
    return model, None


def _cache_frozen_image_features(model: nn.Module, product_chunk: dict) -> dict:
    """Runs a frozen image tower once: its features need no second pass in the replay. Under LiT
    (`train_dual_text_tower`) the features include trained projections, so they are not frozen."""
    if "pixel_values" not in product_chunk or "image_features" in product_chunk:
        return product_chunk
    if getattr(model, "image_tower", None) is None or not model.image_features_are_frozen:
        return product_chunk
    cached = dict(product_chunk)
    cached["image_features"] = model.get_image_features(cached.pop("pixel_values"), cached.get("image_mask"))
    return cached


def _check_mini_batch_size(mini_batch_size) -> None:
    if isinstance(mini_batch_size, bool) or not isinstance(mini_batch_size, int) or mini_batch_size < 1:
        raise ValueError(f"`mini_batch_size` must be a positive integer, got {mini_batch_size!r}.")


def _add_gradient(parameter: nn.Parameter, grad: torch.Tensor) -> None:
    if parameter.grad is None:
        parameter.grad = grad
    else:
        parameter.grad += grad


@dataclass
class _Side:
    """One side of the batch (queries or products) as the replay needs it: how to embed a chunk, the chunks,
    their random states, and d loss / d embedding of every row (float32)."""

    embed: Callable[..., torch.Tensor]
    chunks: list[dict[str, torch.Tensor]]
    snapshots: list[RandomStateSnapshot] = field(default_factory=list)
    embedding_grads: torch.Tensor | None = None


class CachedNTXentLoss:
    r"""
    The NT-Xent loss of `MultimodalRetrievalModel` (symmetric, in-batch negatives, hard negatives and
    false-negative masks as in the model's own loss), computed with GradCache so that only `mini_batch_size`
    rows go through the towers with autograd at a time. Gradients equal those of `model(**batch).loss`
    (up to float rounding), whatever the batch size.

    Calling `loss_fn(model, batch)`:

    1. embeds queries and products in chunks of `mini_batch_size` rows without autograd, remembering each
       chunk's random-number state (so dropout draws the same masks again in step 3);
    2. computes the full-batch loss on leaf copies of the embeddings and caches d loss / d embedding of every
       row (and the gradients of the loss's own parameters, the logit scale);
    3. returns the loss as a tensor whose backward, instead of running through the towers, re-embeds every
       chunk with autograd and pushes its cached gradients into the towers, multiplied by the gradient the
       loss receives (so fp16 loss scaling and gradient-accumulation division apply as to any loss).

    The autocast state at call time (device type, dtype, enabled) is recorded and re-entered for every chunk
    forward, including the replay during backward, which may run outside the caller's autocast block.

    Args:
        mini_batch_size: rows embedded at once, for queries and products alike (the last chunk may be smaller).
            Smaller saves memory, larger is faster; it does not change the result.

    Inputs:
        - `model`: a `MultimodalRetrievalModel`, or one wrapped in `DistributedDataParallel` (as
          `accelerator.prepare` does for several processes).
        - `batch`: the inputs of `model.forward` (`query_*`, `product_*`, `pixel_values`, `image_mask`,
          `image_features`, `false_negative_mask`), as `RetrievalCollator` makes them; products are the
          positives followed by any hard negatives.

    Returns:
        The full-batch loss, a detached scalar whose `backward()` accumulates the towers' gradients into `.grad`.
        The optimizer step and `zero_grad` stay with the caller.

    Multi-process training: the loss gathers the embeddings of every process (with gradients), so the call runs
    collectives and must be made on every process. With a DDP-wrapped model the towers are run through
    `model.module`, which leaves DDP's reducer idle (its hooks only fire after a `DDP.forward`); the gradients
    are instead averaged with one all-reduce per step after the replay. Called inside `model.no_sync()` (e.g. the
    non-final micro-steps of `accelerator.accumulate`) that all-reduce is skipped, as DDP would (DDP too decides
    at forward time). DDP's buffer broadcast is skipped as well (the towers have no batch-norm statistics).

    References:
        - Gao, Zhang, Han and Callan, 2021. "Scaling Deep Contrastive Learning Batch Size under Memory Limited
          Setup". https://arxiv.org/abs/2101.06983
        - sentence-transformers' `CachedMultipleNegativesRankingLoss`, the same technique as a loss.

    Relations:
        - `modeling_mmretrieval.losses.NTXentLoss` is the loss computed here; `model(**batch).loss` is the plain
          path with the same gradients, holding every row's activations at once.
        - Combines with gradient checkpointing (less memory per chunk) and gradient accumulation (more steps,
          not more negatives: only a larger batch adds negatives, which is what this loss makes affordable).

    Example:
    ```python
    >>> loss_fn = CachedNTXentLoss(mini_batch_size=32)
    >>> loss_fn
    CachedNTXentLoss(mini_batch_size=32)
    >>> for batch in loader:  # e.g. 1024 pairs per batch with the memory of 32
    ...     with accelerator.autocast():
    ...         loss = loss_fn(model, batch)
    ...     accelerator.backward(loss)
    ...     optimizer.step()
    ...     optimizer.zero_grad()
    ```
    """

    def __init__(self, mini_batch_size: int):
        _check_mini_batch_size(mini_batch_size)
        self.mini_batch_size = mini_batch_size

    def __call__(self, model: nn.Module, batch: dict) -> torch.Tensor:
        module, ddp = _unwrap(model)
        first_parameter = next(module.parameters())
        autocast = AutocastState.capture(first_parameter.device.type)
        query_inputs, product_inputs = split_model_inputs(batch)
        with torch.no_grad(), autocast.enter():
            product_chunks = [
                _cache_frozen_image_features(module, chunk)
                for chunk in chunk_rows(product_inputs, self.mini_batch_size)
            ]
        sides = [
            _Side(module.get_query_embeddings, chunk_rows(query_inputs, self.mini_batch_size)),
            _Side(module.get_product_embeddings, product_chunks),
        ]

        # 1. Embeddings without autograd, remembering each chunk's random state for the replay.
        leaves = []
        with torch.no_grad():
            for side in sides:
                embeddings = []
                for chunk in side.chunks:
                    side.snapshots.append(RandomStateSnapshot([first_parameter, *chunk.values()]))
                    with autocast.enter():
                        embeddings.append(side.embed(**chunk))
                leaves.append(torch.cat(embeddings).requires_grad_())

        # 2. Full-batch loss on leaf copies: gradients with respect to every embedding row and the logit scale.
        with torch.enable_grad(), autocast.enter():
            loss = module.score(
                *leaves, return_loss=True, false_negative_mask=batch.get("false_negative_mask")
            ).loss
        trainable = [parameter for parameter in module.parameters() if parameter.requires_grad]
        grads = torch.autograd.grad(loss, [*leaves, *trainable], allow_unused=True)
        for side, grad in zip(sides, grads):
            # float32, so that multiplying by a large fp16 loss scale in the replay cannot overflow.
            side.embedding_grads = grad.float()
        loss_parameter_grads = [(p, g) for p, g in zip(trainable, grads[len(leaves):]) if g is not None]

        # 3. The returned loss replays the towers when it is back-propagated.
        cached_loss = loss.detach().requires_grad_()
        # As DDP does, whether gradients are averaged across processes is decided at forward time (`no_sync`).
        synced = ddp is not None and ddp.require_backward_grad_sync
        cached_loss.register_hook(functools.partial(
            self._replay, sides=sides, loss_parameter_grads=loss_parameter_grads, autocast=autocast,
            gradients_to_average=list(module.parameters()) if synced else None,
            process_group=ddp.process_group if ddp is not None else None,
        ))
        return cached_loss

    def _replay(self, loss_grad: torch.Tensor, *, sides: list[_Side], loss_parameter_grads, autocast: AutocastState,
                gradients_to_average, process_group) -> None:
        """Backward hook of the returned loss: re-embeds each chunk with autograd and back-propagates its cached
        embedding gradients, scaled by `loss_grad` (what the loss itself receives)."""
        for parameter, grad in loss_parameter_grads:
            _add_gradient(parameter, grad * loss_grad)
        with torch.enable_grad():
            for side in sides:
                for chunk, snapshot, grad in zip(side.chunks, side.snapshots,
                                                 side.embedding_grads.split(self.mini_batch_size)):
                    with snapshot.replay(), autocast.enter():
                        embeddings = side.embed(**chunk)
                    if embeddings.requires_grad:
                        torch.autograd.backward(embeddings, (grad * loss_grad).to(embeddings.dtype))
        if gradients_to_average is not None:
            average_gradients_across_processes(gradients_to_average, process_group)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(mini_batch_size={self.mini_batch_size})"


__all__ = [
    "AutocastState",
    "CachedNTXentLoss",
    "RandomStateSnapshot",
    "average_gradients_across_processes",
    "chunk_rows",
]

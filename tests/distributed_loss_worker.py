"""One process of the multi-process NT-Xent check in `test_distributed.py` (run by `accelerate launch`).

Each process takes its share of every global batch saved by the test, runs the model wrapped by
`accelerator.prepare` (DistributedDataParallel on CPU/gloo) and saves, per batch and per method, its
local loss and its parameter gradients after the backward (already averaged across processes by DDP or
by the GradCache loss). Methods, in this order on the same weights: the plain `model(**batch).loss`
backward, the `CachedNTXentLoss` backward, the plain backward again (DDP must still work after a GradCache
step), and the `CachedNTXentLoss` backward inside `model.no_sync()` (gradients stay local).

Usage (`--multi_gpu` selects accelerate's torchrun launcher; the worker itself runs on CPU with gloo.
In accelerate 1.15 `--cpu --num_processes 2` starts a single process unless an MPI hostfile is given):

    accelerate launch --multi_gpu --num_processes 2 distributed_loss_worker.py MODEL_DIR BATCHES_FILE OUTPUT_DIR
"""

import argparse
from pathlib import Path

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from modeling_mmretrieval import MultimodalRetrievalModel
from modeling_mmretrieval.training.cached_loss import CachedNTXentLoss


def local_share(batch: dict, rank: int, world_size: int) -> dict:
    """This process's queries, their positives, and an equal share of the hard negatives.

    The global batch lists its products as all positives, then all hard negatives; the share keeps that
    layout (positives for the local queries first), which `NTXentLoss` expects on every process.
    """
    num_pairs = batch["query_input_ids"].shape[0]
    num_negatives = batch["product_input_ids"].shape[0] - num_pairs
    if num_pairs % world_size or num_negatives % world_size:
        raise ValueError(
            f"{num_pairs} pairs and {num_negatives} hard negatives do not split over {world_size} processes."
        )
    pairs_per_process, negatives_per_process = num_pairs // world_size, num_negatives // world_size
    pair_rows = torch.arange(rank * pairs_per_process, (rank + 1) * pairs_per_process)
    negative_rows = num_pairs + torch.arange(rank * negatives_per_process, (rank + 1) * negatives_per_process)
    product_rows = torch.cat([pair_rows, negative_rows])
    return {key: value[pair_rows] if key.startswith("query_") else value[product_rows] for key, value in batch.items()}


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients by parameter name of the unwrapped model, then cleared."""
    model = getattr(model, "module", model)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("batches_file", help="torch.save'd {name: global batch}")
    parser.add_argument("output_dir")
    parser.add_argument("--mini-batch-size", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    # The text towers' BERT pooler is trainable but unused by the model, so DDP must be told to expect
    # parameters without gradients (otherwise its reduction never completes).
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.num_processes < 2:
        raise SystemExit(f"Expected a multi-process launch, got {accelerator.num_processes} process.")
    # Eval mode: dropout masks drawn on two processes cannot match the masks of one process.
    model = accelerator.prepare(MultimodalRetrievalModel.from_pretrained(args.model_dir).eval())
    global_batches = torch.load(args.batches_file)
    cached_loss = CachedNTXentLoss(args.mini_batch_size)

    results = {}
    for name, global_batch in global_batches.items():
        batch = local_share(global_batch, accelerator.process_index, accelerator.num_processes)
        loss = model(**batch).loss
        accelerator.backward(loss)
        results[name, "plain"] = {"loss": loss.detach(), "grads": gradients(model)}

        loss = cached_loss(model, batch)
        accelerator.backward(loss)
        results[name, "grad_cache"] = {"loss": loss.detach(), "grads": gradients(model)}

        loss = model(**batch).loss
        accelerator.backward(loss)
        results[name, "plain_after_grad_cache"] = {"loss": loss.detach(), "grads": gradients(model)}

        # As in the non-final micro-steps of `accelerator.accumulate`: local gradients, no all-reduce.
        with model.no_sync():
            loss = cached_loss(model, batch)
            accelerator.backward(loss)
        results[name, "grad_cache_no_sync"] = {"loss": loss.detach(), "grads": gradients(model)}

    results["setup"] = {"distributed_type": accelerator.distributed_type.value, "backend": accelerator.state.backend}
    torch.save(results, Path(args.output_dir) / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()

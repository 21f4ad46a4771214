"""The training run: setting it up on 🤗 Accelerate, the optimisation loop, and what it leaves behind.

`run_training(args)` is what `mmretrieval train` / `examples/train.py` runs (`args` from
`modeling_mmretrieval.commands.train.parse_args`): build the model (`model_builder`) and data
(`training_data`), prepare them with accelerate, resume from a checkpoint if asked (`checkpoints`), evaluate,
train, evaluate again, save the final model with its card, write `results.json`.

Every micro-batch takes the same path, with or without GradCache:

```python
>>> loss_fn = build_loss_fn(mini_batch_size=None)    # model(**batch).loss; CachedNTXentLoss(32) with 32
>>> loss = training_step(accelerator, model, loss_fn, batch)  # autocast forward, accelerator.backward
```
"""

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import speedups
from ..atomic_files import publish_directory, write_json_atomically
from ..data import CatalogueColumns, RetrievalCollator
from ..retrieval.evaluator import RetrievalEvaluator
from .cached_loss import CachedNTXentLoss
from .checkpoints import (
    TEMPORARY_PREFIX,
    check_run_signature,
    load_trainer_state,
    remove_temporary_checkpoints,
    resolve_checkpoint,
    save_training_checkpoint,
)
from .hub import push_folder_to_hub
from .model_builder import build_model_and_processor
from .model_card import ModelCardInfo, render_model_card
from .optimization import (
    EpochSeededSampler,
    NonFiniteLossError,
    all_finite,
    build_lr_scheduler,
    check_mixed_precision_supported,
    parameter_groups,
    training_length,
    warmup_steps_for,
)
from .reporting import format_results_table
from .training_data import build_collator, build_evaluator, load_training_data
from .dual_encoder_alignment import prepare_aligned_pair
from .visual_word_restoration import VisualWordRestorationLoss, restoration_weight

logger = get_logger(__name__)

LossFunction = Callable[[torch.nn.Module, dict], torch.Tensor]


# ----------------------------------------------------------------------------------------------------------------
# One step
# ----------------------------------------------------------------------------------------------------------------


def model_loss(model, batch: dict) -> torch.Tensor:
    """The plain loss: the model's own NT-Xent over the whole batch, every row's activations held at once."""
    return model(**batch).loss


def build_loss_fn(mini_batch_size: int | None) -> LossFunction:
    """`CachedNTXentLoss(mini_batch_size)` (GradCache: same gradients, memory of one chunk) when given, else
    `model_loss`.

    Example:
    ```python
    >>> build_loss_fn(32)
    CachedNTXentLoss(mini_batch_size=32)
    ```
    """
    return CachedNTXentLoss(mini_batch_size) if mini_batch_size else model_loss


def training_step(accelerator, model, loss_fn: LossFunction, batch: dict) -> torch.Tensor:
    """Forward under the run's autocast and backward (loss scaling, accumulation) of one micro-batch; returns the
    detached loss.

    Example:
    ```python
    >>> with accelerator.accumulate(model):
    ...     loss = training_step(accelerator, model, build_loss_fn(None), batch)
    ```
    """
    with accelerator.autocast():
        loss = loss_fn(model, batch)
    accelerator.backward(loss)
    return loss.detach()


def finite_on_every_process(accelerator, loss: torch.Tensor) -> bool:
    # Every process must take the same decision, or the next collective operation would hang.
    return bool(accelerator.gather(torch.isfinite(loss).reshape(1)).all())


def evaluate(accelerator, evaluator: RetrievalEvaluator | None, model) -> dict:
    """Evaluator metrics, computed on the main process (an exact index of the held-out catalogue)."""
    metrics = {}
    if evaluator is not None and accelerator.is_main_process:
        metrics = evaluator(accelerator.unwrap_model(model))
    accelerator.wait_for_everyone()
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class PreparedRun:
    """What the loop works with, after `accelerator.prepare`."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    train_dataloader: DataLoader
    loss_fn: LossFunction
    evaluator: RetrievalEvaluator | None
    checkpoints_dir: Path
    max_train_steps: int
    collator: RetrievalCollator | None = None


def initial_state(args, accelerator, checkpoints_dir: Path, signature: dict) -> tuple[dict, Path | None]:
    """The run state: fresh, or read back from `--resume_from_checkpoint` (model, optimizer, scheduler and RNG
    states are restored into the prepared objects)."""
    checkpoint = resolve_checkpoint(args.resume_from_checkpoint, checkpoints_dir)
    if checkpoint is None:
        if accelerator.is_main_process:
            remove_temporary_checkpoints(checkpoints_dir)
        state = {"completed_steps": 0, "epoch": 0, "batches_seen_in_epoch": 0, "skipped_steps": 0, "history": [],
                 "signature": signature}
        return state, None
    state = load_trainer_state(checkpoint)
    check_run_signature(state["signature"], signature, checkpoint)
    accelerator.load_state(str(checkpoint))
    logger.info(f"Resumed from {checkpoint} at step {state['completed_steps']} (epoch {state['epoch']}, "
                f"batch {state['batches_seen_in_epoch']})")
    return state, checkpoint


def train(args, run: PreparedRun, state: dict) -> None:
    """The optimisation loop; updates `state` (JSON-serialisable, saved in every checkpoint) in place."""
    accelerator, model, optimizer, lr_scheduler = run.accelerator, run.model, run.optimizer, run.lr_scheduler
    progress = tqdm(total=run.max_train_steps, initial=state["completed_steps"], desc="Training",
                    disable=not accelerator.is_local_main_process)
    recent_losses: list[float] = []
    window_is_finite = True
    model.train()
    while state["completed_steps"] < run.max_train_steps:
        run.train_dataloader.set_epoch(state["epoch"])
        if run.collator is not None:
            run.collator.set_epoch(state["epoch"])  # seeded augmentation draws, the same after a resume
        batches = run.train_dataloader
        if state["batches_seen_in_epoch"]:
            batches = accelerator.skip_first_batches(run.train_dataloader, state["batches_seen_in_epoch"])
        for batch in batches:
            with accelerator.accumulate(model):
                loss = training_step(accelerator, model, run.loss_fn, batch)
                state["batches_seen_in_epoch"] += 1
                window_is_finite &= finite_on_every_process(accelerator, loss)
                if accelerator.sync_gradients and args.max_grad_norm and window_is_finite:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    # Under fp16 an inf norm is the loss scaler's business: it skips the step and lowers the scale.
                    window_is_finite = accelerator.scaler is not None or all_finite(grad_norm)
                if not window_is_finite and args.nan_policy == "stop":
                    raise NonFiniteLossError(
                        f"Non-finite loss or gradient (loss {loss.item()}) at optimizer step "
                        f"{state['completed_steps'] + 1}, epoch {state['epoch']}, "
                        f"batch {state['batches_seen_in_epoch']}. Nothing of this step was saved. Lower the learning "
                        "rates, use bf16 instead of fp16, or pass --nan_policy skip."
                    )
                if accelerator.sync_gradients:
                    if window_is_finite:
                        optimizer.step()
                    else:
                        state["skipped_steps"] += 1
                        logger.warning(f"Skipping optimizer step {state['completed_steps'] + 1}: non-finite loss or "
                                       "gradient.")
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if all_finite(loss):
                recent_losses.append(loss.item())
            if not accelerator.sync_gradients:
                continue
            window_is_finite = True
            state["completed_steps"] += 1
            step = state["completed_steps"]
            progress.update(1)
            if step % args.logging_steps == 0 and recent_losses:
                state["last_logged_loss"] = sum(recent_losses) / len(recent_losses)
                recent_losses.clear()
                progress.set_postfix(loss=f"{state['last_logged_loss']:.4f}")
                accelerator.log({
                    "train/loss": state["last_logged_loss"],
                    "train/lr_head": lr_scheduler.get_last_lr()[-1],
                    "train/logit_scale": accelerator.unwrap_model(model).logit_scale.exp().item(),
                }, step=step)
            if args.eval_steps and step % args.eval_steps == 0 and step < run.max_train_steps:
                metrics = evaluate(accelerator, run.evaluator, model)
                state["history"].append({"step": step, **metrics})
                accelerator.log(metrics, step=step)
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                save_training_checkpoint(accelerator, run.checkpoints_dir, state, keep=args.checkpoints_total_limit)
            if step >= run.max_train_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_seen_in_epoch"] = 0
    progress.close()


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def training_settings(args, accelerator, max_train_steps: int, num_epochs: int, image_size: int | None,
                      cached_features: bool) -> dict:
    """The settings the model card reports."""
    warmup = args.warmup_steps if args.warmup_steps is not None else f"{args.warmup_ratio:.0%}"
    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    return {
        "optimizer steps": max_train_steps,
        "epochs": num_epochs,
        "batch size (total)": args.per_device_train_batch_size * processes * accumulation,
        "processes": processes,
        "tower / head learning rate": f"{args.tower_learning_rate} / {args.head_learning_rate}",
        "weight decay": args.weight_decay,
        "schedule": f"{args.lr_scheduler_type}, warmup {warmup}",
        "mixed precision": args.mixed_precision,
        "hard negatives per query": args.num_hard_negatives,
        "visual-word dropout / restoration weight": f"{args.visual_word_dropout} / {args.visual_word_restoration}",
        "image size": image_size,
        "cached image features": cached_features,
        "seed": args.seed,
    }


def tracker_config(args) -> dict:
    """Hyper-parameters as TensorBoard accepts them (scalars and strings only)."""
    scalar = (int, float, str, bool)
    return {name: value if isinstance(value, scalar) else str(value) for name, value in vars(args).items()}


def save_final_model(accelerator, model, processor, output_dir: Path, model_card: str) -> Path:
    """Save model (safetensors), processor and model card to `output_dir/final`, replacing it in one rename."""
    final_dir = output_dir / "final"
    state_dict = accelerator.get_state_dict(model)  # a collective under DeepSpeed/FSDP: every process calls it
    if accelerator.is_main_process:
        temporary = output_dir / f"{TEMPORARY_PREFIX}final"
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.model_card = model_card  # saved as README.md, and what `push_to_hub` uploads
        unwrapped.save_pretrained(temporary, state_dict=state_dict)
        processor.save_pretrained(temporary)
        publish_directory(temporary, final_dir)
    accelerator.wait_for_everyone()
    return final_dir


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


def run_training(args) -> dict:
    """Train as the command line `args` say; returns what `results.json` holds.

    Raises `NonFiniteLossError` (`--nan_policy stop`) and `CheckpointMismatchError` (resuming a run of other
    settings); the train command turns them into an error line and exit status 1.

    Example:
    ```python
    >>> from modeling_mmretrieval.commands.train import parse_args
    >>> results = run_training(parse_args(["--output_dir", "outputs/main_job"]))
    >>> results["after"]["eval/recall@10"]
    0.9607
    ```
    """
    started = time.perf_counter()
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_dir=str(output_dir),
    )
    check_mixed_precision_supported(args.mixed_precision, accelerator.device)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    # The run's progress lines, and why a speedup is off (e.g. the fast image path for this image processor).
    for package in (__package__, speedups.__name__):
        logging.getLogger(package).setLevel(logging.INFO)
    if not accelerator.is_local_main_process:
        datasets.utils.logging.disable_progress_bar()
    loss_fn = build_loss_fn(args.mini_batch_size)
    set_seed(args.seed)

    # The columns the train command fitted to the catalogue (every `--<name>_column` flag), else the basic flags.
    columns = getattr(args, "catalogue_columns", None) or CatalogueColumns(
        product_id=args.product_id_column, title=args.title_column, description=args.description_column,
        image=args.image_column, query=args.query_column,
    )
    data = load_training_data(args, columns)
    if args.architecture == "4tower" and not args.model_name_or_path:
        with accelerator.main_process_first():  # `--clip_model aligned`: one process aligns, the others reuse it
            args.clip_model = prepare_aligned_pair(args, data.products, columns)
    model, processor, towers, image_size = build_model_and_processor(args)
    # On the accelerator before the frozen image features are cached: `accelerator.prepare` moves it only later,
    # and caching would then run the image tower on the CPU.
    model.to(accelerator.device)
    args.visual_word_restoration = restoration_weight(args.visual_word_restoration, model.config)
    if args.visual_word_restoration:
        loss_fn = VisualWordRestorationLoss(loss_fn, args.visual_word_restoration)
    collator = build_collator(args, accelerator, model, processor, data, columns)
    image_checks = dict(max_failure_share=getattr(args, "max_image_failure_share", 0.5),
                        strict=getattr(args, "strict_images", False))
    cache_report = getattr(collator.image_features, "image_report", None)
    if cache_report is not None:  # every training image was loaded once for the cache: report and check it now
        logger.info(f"Image feature cache: {cache_report.summary()}")
        cache_report.check(**image_checks)
    evaluator = build_evaluator(args, accelerator, model, processor, data, columns,
                                cache_image_features=collator.image_features is not None)
    # drop_last: every step sees a full batch of in-batch negatives, and every process contributes as many rows to
    # the gathered loss. The loader's own generator keeps its per-epoch seed draw off the global RNG, whose state
    # the checkpoints restore.
    train_dataloader = accelerator.prepare(DataLoader(
        data.pairs, batch_size=args.per_device_train_batch_size, sampler=EpochSeededSampler(len(data.pairs), args.seed),
        collate_fn=collator, drop_last=True, num_workers=args.dataloader_num_workers, generator=torch.Generator(),
    ))
    steps_per_epoch, max_train_steps, num_epochs = training_length(
        len(train_dataloader), args.gradient_accumulation_steps, args.num_train_epochs, args.max_train_steps
    )
    optimizer = torch.optim.AdamW(parameter_groups(
        model, tower_learning_rate=args.tower_learning_rate, head_learning_rate=args.head_learning_rate,
        weight_decay=args.weight_decay,
    ))
    # accelerate steps a prepared scheduler once per process at every optimizer step, hence the factor.
    warmup_steps = warmup_steps_for(max_train_steps, args.warmup_steps, args.warmup_ratio)
    lr_scheduler = build_lr_scheduler(
        optimizer, args.lr_scheduler_type, num_warmup_steps=warmup_steps * accelerator.num_processes,
        num_training_steps=max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)

    signature = {  # what fixes the data order and the step arithmetic: a resumed run must share it
        "seed": args.seed,
        "num_train_pairs": len(data.pairs),
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": accelerator.num_processes,
        "max_train_steps": max_train_steps,
    }
    state, checkpoint = initial_state(args, accelerator, checkpoints_dir, signature)
    if args.report_to != "none":
        accelerator.init_trackers("mmretrieval", config=tracker_config(args))
    if "before_metrics" not in state:
        state["before_metrics"] = evaluate(accelerator, evaluator, model)
        accelerator.log(state["before_metrics"], step=0)
    logger.info(f"{len(data.pairs)} training pairs, {steps_per_epoch} optimizer steps per epoch, {max_train_steps} "
                f"steps ({num_epochs} epochs), batch {args.per_device_train_batch_size} x {accelerator.num_processes} "
                f"processes x {args.gradient_accumulation_steps} accumulation")

    train_started = time.perf_counter()
    run = PreparedRun(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, evaluator,
                      checkpoints_dir, max_train_steps, collator)
    train(args, run, state)
    train_seconds = time.perf_counter() - train_started

    after_metrics = evaluate(accelerator, evaluator, model)
    accelerator.log(after_metrics, step=state["completed_steps"])
    card = ModelCardInfo(
        config=accelerator.unwrap_model(model).config, towers=towers, dataset=str(args.dataset),
        queries_are_derived=data.queries_are_derived, num_train_pairs=len(data.pairs), eval_split=args.eval_split,
        training_settings=training_settings(args, accelerator, max_train_steps, num_epochs, image_size,
                                            cached_features=collator.image_features is not None),
        before=state["before_metrics"], after=after_metrics, image_size=image_size,
        repo_id=args.hub_model_id or output_dir.resolve().name,
    )
    final_dir = save_final_model(accelerator, model, processor, output_dir, render_model_card(card))
    results = {
        "before": state["before_metrics"],
        "after": after_metrics,
        "history": state["history"],
        "training": {
            "completed_steps": state["completed_steps"], "skipped_steps": state["skipped_steps"],
            "epochs": num_epochs, "train_pairs": len(data.pairs), "last_logged_loss": state.get("last_logged_loss"),
            "train_seconds_this_run": round(train_seconds, 1),
            "resumed_from": str(checkpoint) if checkpoint else None,
        },
        "model_dir": str(final_dir),
    }
    image_report = collator.image_report.merge(cache_report) if cache_report is not None else collator.image_report
    if collator.uses_images:
        results["images"] = image_report.to_dict()
        logger.info(f"Training products, {image_report.summary()}")
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or output_dir.resolve().name
        results["hub_commit_url"] = push_folder_to_hub(
            final_dir, repo_id, token=args.hub_token, private=args.hub_private
        )
        logger.info(f"Pushed to {results['hub_commit_url']}")
    results["training"]["wall_seconds_this_run"] = round(time.perf_counter() - started, 1)
    if accelerator.is_main_process:
        write_json_atomically(output_dir / "results.json", results)
        if evaluator is not None:
            accelerator.print(f"\nRetrieval on the {args.eval_split} split, before vs after training:")
            accelerator.print(format_results_table(state["before_metrics"], after_metrics))
        accelerator.print(f"\nModel and processor: {final_dir}\nResults: {output_dir / 'results.json'}")
    if collator.uses_images:  # once the results are written: a strict failure still leaves the run's record
        image_report.check(**image_checks)
    accelerator.end_training()
    return results


__all__ = ["PreparedRun", "build_loss_fn", "model_loss", "run_training", "train", "training_step"]

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

import filecmp
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import speedups
from ..atomic_files import publish_directory, recover_directory, write_json_atomically
from ..data import CatalogueColumns, RetrievalCollator
from ..modeling_mmretrieval import MODEL_CARD_NAME
from ..data.queries import derive_query
from ..retrieval.evaluator import RetrievalEvaluator
from ..retrieval.held_out_evaluation import HeldOutEvaluator
from .cached_loss import CachedNTXentLoss
from .checkpoints import (
    TEMPORARY_PREFIX,
    CheckpointMismatchError,
    check_run_signature,
    load_trainer_state,
    save_model_folder,
    save_training_checkpoint,
    start_lineage,
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
from .visual_tagger import (
    DEFAULT_MIN_EXAMPLES,
    DEFAULT_MIN_PROBABILITY,
    MIN_COLOURS,
    VisualTaggerError,
    colours_to_learn,
    fit_visual_tagger,
)
from .image_branch_weight import AUTO, choose_image_branch_weight, image_branch_weight
from .text_tower_anchor import TextTowerAnchorLoss, text_tower_anchor_weight
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
    processor: object | None = None
    # The model card of a checkpoint, from the run state it is saved with (`model_card_for_state`).
    model_card: Callable[[dict], str] | None = None


def initial_state(args, accelerator, checkpoints_dir: Path, signature: dict, max_train_steps: int,
                  lr_scheduler=None) -> tuple[dict, Path | None]:
    """The run state: fresh, or read back from `--resume_from_checkpoint` (model, optimizer, scheduler and RNG
    states are restored into the prepared objects). The checkpoints folder is first made to hold only the
    lineage this run continues (`checkpoints.start_lineage`).

    A checkpoint of a run planned for fewer steps is extended: the run continues to the new `max_train_steps`
    with the learning-rate schedule of the longer run, from the step reached (`continue_schedule`). One past the
    new `max_train_steps` raises `CheckpointMismatchError`.
    """
    checkpoint = start_lineage(accelerator, args.resume_from_checkpoint, checkpoints_dir)
    if checkpoint is None:
        state = {"completed_steps": 0, "epoch": 0, "batches_seen_in_epoch": 0, "skipped_steps": 0, "history": [],
                 "signature": signature, "max_train_steps": max_train_steps}
        return state, None
    state = load_trainer_state(checkpoint)
    check_run_signature(state["signature"], signature, checkpoint)
    if state["completed_steps"] > max_train_steps:
        raise CheckpointMismatchError(
            f"{checkpoint} is at step {state['completed_steps']}, past the {max_train_steps} steps of this run "
            "(--max_train_steps / --num_train_epochs); pass at least as many, or resume from an earlier checkpoint."
        )
    accelerator.load_state(str(checkpoint))
    # Checkpoints written before runs could be extended kept the planned length in the signature.
    planned = state.get("max_train_steps", state["signature"].get("max_train_steps", max_train_steps))
    if planned != max_train_steps:
        if lr_scheduler is not None:
            continue_schedule(lr_scheduler)
        logger.info(f"Extending the run from {planned} to {max_train_steps} optimizer steps; the learning-rate "
                    "schedule is now the longer run's, from the step reached.")
    state["max_train_steps"] = max_train_steps
    state["signature"] = signature
    logger.info(f"Resumed from {checkpoint} at step {state['completed_steps']} (epoch {state['epoch']}, "
                f"batch {state['batches_seen_in_epoch']})")
    return state, checkpoint


def continue_schedule(lr_scheduler) -> list[float]:
    """Set the optimizer's learning rates to the schedule's value at the step reached; returns them.

    A restored scheduler keeps its step count, but the optimizer keeps the learning rates of the schedule the
    checkpoint was written under (0 at the end of a finished linear schedule). The schedule built for a longer
    run gives the rate at that step anew, as transformers' `Trainer` does when `max_steps` grows.

    Example:
    ```python
    >>> continue_schedule(lr_scheduler)  # linear, 6 of now 9 steps, no warmup: a third of each base rate
    [3.3e-06, 3.3e-06, 0.00033, 0.00033]
    ```
    """
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps the torch scheduler
    if not hasattr(scheduler, "lr_lambdas"):
        return scheduler.get_last_lr()
    rates = [base * rate(scheduler.last_epoch) for base, rate in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                                    strict=True)]
    for group, rate in zip(scheduler.optimizer.param_groups, rates, strict=True):
        group["lr"] = rate
    scheduler._last_lr = list(rates)
    return rates


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
            # The last step is always saved too, so a finished run can be extended from where it ended.
            if args.checkpointing_steps and (step % args.checkpointing_steps == 0 or step >= run.max_train_steps):
                save_training_checkpoint(
                    accelerator, run.checkpoints_dir, state, keep=args.checkpoints_total_limit, model=model,
                    processor=run.processor, model_card=run.model_card(state) if run.model_card else None,
                )
            if step >= run.max_train_steps:
                break
        else:
            state["epoch"] += 1
            state["batches_seen_in_epoch"] = 0
    progress.close()


# ----------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------


def final_image_branch_weight(args, accelerator, model, processor, data, columns: CatalogueColumns,
                              evaluator) -> dict:
    """Sets the image branch weight of the trained model (`--image_branch_weight`, `training.image_branch_weight`)
    before it is evaluated and saved. With `"auto"`: the candidate with the best nDCG@10 on the evaluation split's
    products, with queries phrased as training phrases them and drawn with another seed than the reported
    evaluation's (a catalogue's own evaluation queries where it has them); without an evaluation split, the weight
    the model already has (1 for a new model). Returns `{"chosen": weight, "how": ..., "scores": {weight: nDCG@10}
    or None}` for `results.json`.

    Example: `final_image_branch_weight(args, accelerator, model, processor, data, columns, evaluator)["chosen"]`.
    """
    final_model = accelerator.unwrap_model(model)
    weight, how, scores = args.image_branch_weight, "--image_branch_weight", None
    if weight == AUTO and evaluator is None:
        weight, how = final_model.config.image_branch_weight, "auto without an evaluation split: the model's own"
        logger.info(f"--image_branch_weight auto: no evaluation split to choose on, so the model keeps its image "
                    f"branch weight ({weight:g})")
    elif weight == AUTO:
        how, choosing = "auto: best nDCG@10 on the evaluation split's products", evaluator
        if data.eval_queries is None:  # derived queries: training phrasing, other draws than the reported ones
            choosing = HeldOutEvaluator(data.eval_products, num_queries=args.max_eval_queries, seed=args.seed + 1,
                                        columns=columns, processor=processor, name="choice",
                                        batch_size=args.per_device_eval_batch_size, phrase=derive_query,
                                        fetch_images=getattr(args, "fetch_images", False),
                                        image_features=evaluator.image_features)
        metric = f"{choosing.name}/ndcg@10"

        def score(candidate: float) -> float:
            final_model.set_image_branch_weight(candidate)
            metrics = evaluate(accelerator, choosing, model)
            if accelerator.is_main_process and metric not in metrics:
                raise RuntimeError(f"--image_branch_weight auto: the evaluation gave no {metric}")
            return metrics.get(metric, 0.0)

        weight, scores = choose_image_branch_weight(score)
        if accelerator.num_processes > 1:  # only the main process evaluates: every process takes its choice
            weight, scores = broadcast_object_list([weight, scores], from_process=0)
        logger.info(f"--image_branch_weight auto: nDCG@10 on the evaluation split's products for weights "
                    f"{', '.join(f'{c:g}: {v:.4f}' for c, v in scores.items())}; the final model searches with {weight:g}")
    if final_model.config.image_branch_weight != weight:
        final_model.set_image_branch_weight(weight)
        logger.info(f"The final model's image branch is weighted {weight:g} (--image_branch_weight).")
    args.image_branch_weight = weight  # what the model card reports
    return {"chosen": weight, "how": how,
            "scores": None if scores is None else {str(candidate): value for candidate, value in scores.items()}}


def training_settings(args, accelerator, max_train_steps: int, num_epochs: int, image_size: int | None,
                      cached_features: bool, model_config=None) -> dict:
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
        "text-tower anchor weight": getattr(args, "text_tower_anchor", 0.0),
        # The model's own until the final model's is set (checkpoints search with the weight they trained with).
        "image branch weight at search": getattr(model_config, "image_branch_weight", 1.0),
        "visual-word tagger": (
            f"{len(model_config.visual_tags)} colours, min probability {model_config.visual_tag_min_probability}"
            + (", also among the colours a text names" if getattr(model_config, "visual_tag_named_token_ids", None)
               else "")) if getattr(model_config, "visual_tags", None) else "none",
        "colour description of the photos": (f"{model_config.colour_histogram_levels} levels per channel"
                                             if getattr(model_config, "colour_histogram_levels", 0) else "none"),
        "image size": image_size,
        "cached image features": cached_features,
        "seed": args.seed,
    }


def tracker_config(args) -> dict:
    """Hyper-parameters as TensorBoard accepts them (scalars and strings only)."""
    scalar = (int, float, str, bool)
    return {name: value if isinstance(value, scalar) else str(value) for name, value in vars(args).items()}


# The package each accelerate tracker needs, where its name differs from the tracker's.
_TRACKER_PACKAGES = {"aim": "aim", "comet_ml": "comet-ml", "dvclive": "dvclive", "tensorboard": "tensorboard"}


def trackers_for(report_to: str | Sequence[str] | None) -> list[str] | None:
    """`--report_to` values (names, comma-separated or several; "all"; "none") as accelerate's `log_with`, or None.

    Every tracker accelerate supports is accepted (`accelerate.tracking.LOGGER_TYPE_TO_CLASS`: tensorboard,
    wandb, mlflow, trackio, comet_ml, aim, clearml, dvclive, swanlab); "all" is every one installed. A tracker
    whose package is missing raises `ValueError` (accelerate would silently drop it).

    Example:
    ```python
    >>> trackers_for("none") is None
    True
    >>> trackers_for(["tensorboard,mlflow"])  # with both packages installed
    ['tensorboard', 'mlflow']
    ```
    """
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    values = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    names = list(dict.fromkeys(name.strip().lower() for value in values if value
                               for name in str(value).split(",") if name.strip()))
    if not names or names == ["none"]:
        return None
    if "none" in names:
        raise ValueError(f"--report_to none cannot be combined with trackers (got {' '.join(names)})")
    available = [str(getattr(tracker, "value", tracker)) for tracker in get_available_trackers()]
    if "all" in names:
        if not available:
            raise ValueError(f"--report_to all: none of the trackers accelerate supports is installed "
                             f"({', '.join(sorted(LOGGER_TYPE_TO_CLASS))}); pip install one, e.g. tensorboard")
        return available
    for name in names:
        if name not in LOGGER_TYPE_TO_CLASS:
            raise ValueError(f"--report_to {name}: not a tracker accelerate supports; choose from none, all, "
                             f"{', '.join(sorted(LOGGER_TYPE_TO_CLASS))}")
        if name not in available:
            raise ValueError(f"--report_to {name}: its package is not installed "
                             f"(pip install {_TRACKER_PACKAGES.get(name, name)})")
    return names


def save_final_model(accelerator, model, processor, output_dir: Path, model_card: str,
                     card_keeping_evaluation: Callable[[dict], str] | None = None) -> tuple[Path, dict | None]:
    """Save model (safetensors), processor and model card to `output_dir/final`, swapped in with one rename
    (`atomic_files.publish_directory`): `final/` is always the old complete model or the new one.

    With `card_keeping_evaluation` (a run without evaluation), weights byte-identical to those of the `final/`
    they replace keep the earlier `results.json`'s evaluation: the card is `card_keeping_evaluation(earlier)`.
    Returns `final/` and that earlier results dict (None when not kept).

    Example:
    ```python
    >>> save_final_model(accelerator, model, processor, Path("outputs/run"), card)
    (PosixPath('outputs/run/final'), None)
    ```
    """
    final_dir = output_dir / "final"
    temporary = output_dir / f"{TEMPORARY_PREFIX}final"
    if accelerator.is_main_process:
        recover_directory(final_dir)  # a run killed while publishing: its complete earlier final/ back first
        if temporary.exists():  # a run killed while writing, or right after swapping: never mix its files in
            shutil.rmtree(temporary)
    save_model_folder(accelerator, model, processor, temporary, model_card)
    earlier = None
    if accelerator.is_main_process:
        if card_keeping_evaluation is not None:
            earlier = earlier_results_of_same_weights(output_dir, temporary)
            if earlier is not None:
                (temporary / MODEL_CARD_NAME).write_text(card_keeping_evaluation(earlier), encoding="utf-8")
        publish_directory(temporary, final_dir)
    accelerator.wait_for_everyone()
    return final_dir, earlier


def _branch_weight(model_dir: Path) -> float | None:
    try:
        return json.loads((model_dir / "config.json").read_text(encoding="utf-8")).get("image_branch_weight", 1.0)
    except (OSError, ValueError):
        return None


def earlier_results_of_same_weights(output_dir: Path, new_model_dir: Path) -> dict | None:
    """The earlier `results.json`, when it holds an evaluation and `output_dir/final` holds weights byte-identical
    to `new_model_dir`'s, searched with the same image branch weight (a relaunch of a finished run that trained
    nothing new, or retrained to the same bytes): that evaluation still describes the model."""
    results_path, weights_name = output_dir / "results.json", "model.safetensors"
    old_weights, new_weights = output_dir / "final" / weights_name, new_model_dir / weights_name
    if not (results_path.is_file() and old_weights.is_file() and new_weights.is_file()):
        return None
    if not filecmp.cmp(old_weights, new_weights, shallow=False) or _branch_weight(old_weights.parent) != _branch_weight(
            new_model_dir):  # the same weights searched with another image branch weight rank otherwise
        return None
    try:
        earlier = json.loads(results_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        logger.warning(f"Not reusing the earlier evaluation in {results_path}: {error}")
        return None
    return earlier if isinstance(earlier, dict) and (earlier.get("before") or earlier.get("after")) else None


# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------

# Where launchers put the number of processes: torchrun and accelerate's --multi_gpu, Intel MPI / MPICH, Open MPI,
# MVAPICH.
_WORLD_SIZE_VARIABLES = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_SIZE")


def _world_size() -> int:
    return max((int(os.environ[name]) for name in _WORLD_SIZE_VARIABLES if os.environ.get(name)), default=1)


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU (or another accelerator: XPU, MPS, ...)."""
    current = getattr(torch, "accelerator", None)
    if current is not None and hasattr(current, "is_available"):
        return bool(current.is_available())
    return torch.cuda.is_available()


def runs_on_cpu_in_several_processes() -> bool:
    """True when several processes were launched on a machine without an accelerator (`accelerate launch
    --multi_gpu`, `torchrun` or `mpirun` there): the `Accelerator` must then be built with `cpu=True`, which
    makes it a gloo (MULTI_CPU) group with the right ranks, instead of one rank-0 process per launch.

    Example:
    ```python
    >>> runs_on_cpu_in_several_processes()  # under `torchrun --nproc_per_node 2` on a laptop
    True
    ```
    """
    return _world_size() > 1 and not has_accelerator_device()


def _accelerate_cpu_launch_request() -> tuple[int, int] | None:
    """`(num_processes, num_machines)` when this process was started by `accelerate launch --cpu
    --num_processes N` (N > 1) without an MPI hostfile: accelerate's simple launcher then starts one process
    only. Read from the launcher's command line (Linux `/proc`); None when this is not that case."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true", "yes") or _world_size() > 1:
        return None
    if "MASTER_PORT" not in os.environ:  # the simple launcher sets it only for several processes or machines
        return None
    try:
        launcher = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return None
    # `accelerate launch ...` or `python -m accelerate.commands.launch ...`: the launcher's own flags follow.
    starts = [i + 1 for i, word in enumerate(launcher) if word in ("launch", "accelerate.commands.launch")]
    if not starts:
        return None
    from accelerate.commands.launch import launch_command_parser

    launch_args, _ = launch_command_parser().parse_known_args(launcher[starts[0]:])
    if (launch_args.num_processes or 1) < 2:
        return None
    return launch_args.num_processes, launch_args.num_machines or 1


def relaunch_as_requested_processes() -> None:
    """Make `accelerate launch --cpu --num_processes N examples/train.py ...` train in N processes.

    accelerate's `--cpu` launcher starts a single process unless it is given an MPI hostfile, so the script would
    silently train alone. Here that one process replaces itself with `torch.distributed.run` (torchrun) starting
    N copies of the same command on this machine; each builds a CPU (gloo) `Accelerator` of N ranks. Several
    machines are refused with a pointer to the recipes in docs/training.md.

    Example:
    ```python
    >>> relaunch_as_requested_processes()  # under `accelerate launch --cpu --num_processes 2`: never returns
    ```
    """
    request = _accelerate_cpu_launch_request()
    if request is None:
        return
    num_processes, num_machines = request
    if num_machines > 1:
        raise RuntimeError("accelerate launch --cpu across machines needs an MPI hostfile (--mpirun_hostfile); see "
                           "docs/training.md, Multi-GPU and multi-node")
    # Plain logging: accelerate's logger needs the `Accelerator` this process has not built yet.
    logging.getLogger(__name__).warning(f"accelerate launch --cpu started 1 of the {num_processes} processes asked "
                                        f"for; relaunching with torchrun --nproc_per_node {num_processes}.")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(num_processes),
               "--master_addr", os.environ.get("MASTER_ADDR", "127.0.0.1"),
               "--master_port", os.environ["MASTER_PORT"], sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, command)


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


def tagger_can_learn(args, products, columns: CatalogueColumns) -> bool:
    """Whether the catalogue's colour labels can teach a new image model's visual-word tagger, decided before the
    model is built, so that a colour description only the tagger would read is left out of it (and of its cached
    features). An explicit `--visual_tags` the labels cannot honour stops here, before any image is read.

    Example: `build_model_and_processor(args, tagger_can_learn(args, data.products, columns))`.
    """
    asked = args.visual_tags or (args.visual_tags is None and args.colour_histogram_levels is None)
    if args.model_name_or_path or args.architecture == "text_only" or not asked:
        return True  # nothing of the model depends on it
    colours = colours_to_learn(products, columns)
    if len(colours) >= MIN_COLOURS:
        return True
    if args.visual_tags:
        raise VisualTaggerError(f"cannot fit the visual-word tagger: {len(colours)} colours with at least "
                                f"{DEFAULT_MIN_EXAMPLES} labelled products; it needs {MIN_COLOURS}")
    return False


def fit_visual_tags(args, model, processor, image_features, products, columns: CatalogueColumns):
    """Fits the model's visual-word tagger (`--visual_tags`, on by default for models with a frozen, cached image
    tower) on the training products' cached image features; its report, or `None` when no tagger is fitted.

    Asked for explicitly, a tagger that cannot be fitted stops the run (`VisualTaggerError`); by default the run
    goes on without one and says why.

    Example: `report = fit_visual_tags(args, model, processor, collator.image_features, data.products, columns)`.
    """
    wanted = getattr(args, "visual_tags", None)
    if not model.config.uses_images:
        return None
    # A starting checkpoint's tagger is never kept as it is: it is refitted on this catalogue, or dropped.
    if model.visual_tagger is not None:
        model.remove_visual_tagger()
    if wanted is False:
        return None
    if image_features is None:
        if wanted:
            raise VisualTaggerError("--visual_tags reads the cached features of a frozen image tower; this run trains "
                                    "the image tower or does not cache its features (--no_cache_image_features)")
        return None
    try:
        return fit_visual_tagger(model, processor.tokenizer, image_features, products, columns,
                                 min_probability=getattr(args, "visual_tag_min_probability", DEFAULT_MIN_PROBABILITY),
                                 seed=args.seed, among_named=getattr(args, "tag_among_named_colours", False))
    except VisualTaggerError as error:
        if wanted:
            raise
        logger.warning(f"{error}; training without visual tags")
        return None


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
    relaunch_as_requested_processes()
    output_dir = Path(args.output_dir)
    checkpoints_dir = output_dir / "checkpoints"
    trackers = trackers_for(args.report_to)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=trackers,
        project_dir=str(output_dir),
        cpu=runs_on_cpu_in_several_processes(),
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
    model, processor, towers, image_size = build_model_and_processor(args, tagger_can_learn(args, data.products, columns))
    # On the accelerator before the frozen image features are cached: `accelerator.prepare` moves it only later,
    # and caching would then run the image tower on the CPU.
    model.to(accelerator.device)
    args.text_tower_anchor = text_tower_anchor_weight(getattr(args, "text_tower_anchor", None), model.config)
    args.image_branch_weight = image_branch_weight(getattr(args, "image_branch_weight", None), model.config)
    if args.text_tower_anchor and args.mini_batch_size:  # the default, not a request: GradCache keeps its own loss
        logger.info("The text-tower anchor is off: it does not combine with --mini_batch_size (GradCache).")
        args.text_tower_anchor = 0.0
    if args.text_tower_anchor:
        loss_fn = TextTowerAnchorLoss(args.text_tower_anchor)
    args.visual_word_restoration = restoration_weight(args.visual_word_restoration, model.config)
    if args.visual_word_restoration:
        loss_fn = VisualWordRestorationLoss(loss_fn, args.visual_word_restoration)
    collator = build_collator(args, accelerator, model, processor, data, columns)
    tagger_report = fit_visual_tags(args, model, processor, collator.image_features, data.products, columns)
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
        # The tagger's weights are in every checkpoint: a run with other tags (or none) cannot load them.
        "visual_tags": accelerator.unwrap_model(model).config.visual_tags,
    }
    # The loss changes with them; checkpoints written before the anchor existed trained without it, and those
    # written before the restoration weight was recorded are not checked on it (`check_run_signature`).
    signature["text_tower_anchor"] = args.text_tower_anchor
    signature["visual_word_restoration"] = args.visual_word_restoration
    # Which texts get a tag changes the training texts; checkpoints written before it tagged only silent ones.
    signature["tag_among_named_colours"] = bool(accelerator.unwrap_model(model).config.visual_tag_named_token_ids)
    colour_levels = accelerator.unwrap_model(model).config.colour_histogram_levels
    if colour_levels:  # the cached image features (and the fusion's width) depend on it
        signature["colour_histogram_levels"] = colour_levels
    state, checkpoint = initial_state(args, accelerator, checkpoints_dir, signature, max_train_steps, lr_scheduler)
    steps_before_this_run = state["completed_steps"]
    if trackers:
        accelerator.init_trackers("mmretrieval", config=tracker_config(args))
    if "before_metrics" not in state:
        # "Before training" is the pretrained towers alone: the tagger is fitted on this catalogue, so it waits.
        unwrapped = accelerator.unwrap_model(model)
        tagger, unwrapped.visual_tagger = unwrapped.visual_tagger, None
        try:
            state["before_metrics"] = evaluate(accelerator, evaluator, model)
        finally:
            unwrapped.visual_tagger = tagger
        accelerator.log(state["before_metrics"], step=0)
    logger.info(f"{len(data.pairs)} training pairs, {steps_per_epoch} optimizer steps per epoch, {max_train_steps} "
                f"steps ({num_epochs} epochs), batch {args.per_device_train_batch_size} x {accelerator.num_processes} "
                f"processes x {args.gradient_accumulation_steps} accumulation")

    settings = training_settings(args, accelerator, max_train_steps, num_epochs, image_size,
                                 cached_features=collator.image_features is not None,
                                 model_config=accelerator.unwrap_model(model).config)

    def model_card(before: dict, after: dict, eval_split: str | None = args.eval_split) -> str:
        return render_model_card(ModelCardInfo(
            config=accelerator.unwrap_model(model).config, towers=towers, dataset=str(args.dataset),
            queries_are_derived=data.queries_are_derived, num_train_pairs=len(data.pairs), eval_split=eval_split,
            training_settings=settings, before=before, after=after, image_size=image_size,
            repo_id=args.hub_model_id or output_dir.resolve().name, license=getattr(args, "license", None),
        ))

    def model_card_for_state(at: dict) -> str:  # a checkpoint's card: its step's evaluation, if one ran
        evaluated = [entry for entry in at["history"] if entry.get("step") == at["completed_steps"]]
        after = {name: value for name, value in evaluated[-1].items() if name != "step"} if evaluated else {}
        return model_card(at.get("before_metrics", {}), after)

    train_started = time.perf_counter()
    run = PreparedRun(accelerator, model, optimizer, lr_scheduler, train_dataloader, loss_fn, evaluator,
                      checkpoints_dir, max_train_steps, collator, processor, model_card_for_state)
    train(args, run, state)
    train_seconds = time.perf_counter() - train_started
    branch_choice = final_image_branch_weight(args, accelerator, model, processor, data, columns, evaluator)
    settings["image branch weight at search"] = args.image_branch_weight  # the card says what was chosen

    after_metrics = evaluate(accelerator, evaluator, model)
    accelerator.log(after_metrics, step=state["completed_steps"])
    before_metrics, eval_split = state["before_metrics"], args.eval_split

    def card_keeping_evaluation(earlier: dict) -> str:
        return model_card(earlier.get("before", {}), earlier.get("after", {}), earlier.get("eval_split", "validation"))

    # A relaunch without evaluation must not replace an earlier evaluation of these very weights with nothing.
    final_dir, earlier = save_final_model(accelerator, model, processor, output_dir,
                                          model_card(before_metrics, after_metrics, eval_split),
                                          card_keeping_evaluation if evaluator is None else None)
    if earlier is not None:
        before_metrics, after_metrics = earlier.get("before", {}), earlier.get("after", {})
        eval_split = earlier.get("eval_split", "validation")
        logger.info("No evaluation this run: kept the earlier run's evaluation of these same weights.")
    results = {
        "before": before_metrics,
        "after": after_metrics,
        "eval_split": eval_split,
        "history": state["history"],
        "training": {
            "completed_steps": state["completed_steps"], "skipped_steps": state["skipped_steps"],
            "epochs": num_epochs, "train_pairs": len(data.pairs), "last_logged_loss": state.get("last_logged_loss"),
            "steps_this_run": state["completed_steps"] - steps_before_this_run,
            "train_seconds_this_run": round(train_seconds, 1),
            "resumed_from": str(checkpoint) if checkpoint else None,
        },
        "model_dir": str(final_dir),
    }
    if earlier is not None:
        results["evaluation_kept_from_earlier_run"] = True
    if tagger_report is not None:
        results["visual_tagger"] = tagger_report.to_dict()
    results["image_branch_weight"] = branch_choice
    image_report = collator.image_report.merge(cache_report) if cache_report is not None else collator.image_report
    if collator.uses_images:
        results["images"] = image_report.to_dict()
        logger.info(f"Training products, {image_report.summary()}")
    eval_report = getattr(evaluator, "image_report", None)
    if collator.uses_images and eval_report is not None and eval_report.total:
        results["eval_images"] = eval_report.to_dict()
        logger.info(f"Evaluation products, {eval_report.summary()}")
    if args.push_to_hub and accelerator.is_main_process:
        repo_id = args.hub_model_id or output_dir.resolve().name
        results["hub_commit_url"] = push_folder_to_hub(
            final_dir, repo_id, token=args.hub_token, private=args.hub_private
        )
        logger.info(f"Pushed to {results['hub_commit_url']}")
    results["training"]["wall_seconds_this_run"] = round(time.perf_counter() - started, 1)
    if accelerator.is_main_process:
        write_json_atomically(output_dir / "results.json", results)
        if evaluator is not None or earlier is not None:
            accelerator.print(f"\nRetrieval on the {eval_split} split, before vs after training:")
            accelerator.print(format_results_table(before_metrics, after_metrics))
        accelerator.print(f"\nModel and processor: {final_dir}\nResults: {output_dir / 'results.json'}")
    if collator.uses_images:  # once the results are written: a strict failure still leaves the run's record
        image_report.check(**image_checks)
    accelerator.end_training()
    return results


__all__ = [
    "PreparedRun",
    "build_loss_fn",
    "continue_schedule",
    "model_loss",
    "relaunch_as_requested_processes",
    "run_training",
    "runs_on_cpu_in_several_processes",
    "train",
    "trackers_for",
    "training_step",
]

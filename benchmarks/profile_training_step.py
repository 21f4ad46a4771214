"""Where our text-only training step spends its time: the figures behind the text-only training analysis
in docs/performance.md.

On the training case's batch (32 attribute-derived pairs of the real catalogue, offline MiniLM) it prints
the text tokens the step computes against the texts' real tokens, the step time with the towers' dropout
as configured and switched off (interleaved, so both see the same machine), and the share of the step's
CPU time in the heaviest operators (torch.profiler):

    python benchmarks/profile_training_step.py              # about 1 minute on 2 cores
"""

import argparse
import contextlib

import torch
from bench_training import BATCH_SIZE, _optimizer_step, _our_batch, _padded_lengths, training_rows
from measure import measure_interleaved
from towers import Towers

from modeling_mmretrieval.data import load_catalogue

TOP_OPERATORS = 6


class _Settings:
    """The few `Context` fields the training helpers read."""

    def __init__(self, catalogue, threads: int):
        self.catalogue, self.threads, self.device = catalogue, threads, torch.device("cpu")

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _without_dropout(model) -> None:
    # BERT-style attention passes its dropout module's `p` to sdpa, so this also covers attention dropout.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    towers = Towers.load("offline")
    settings = _Settings(load_catalogue(None), args.threads)
    rows = training_rows(settings, BATCH_SIZE)
    processor = towers.processor("text_only")

    models = {"dropout as configured": towers.retrieval_model("text_only").train()}
    models["dropout off"] = towers.retrieval_model("text_only").train()
    _without_dropout(models["dropout off"])
    batch, _ = _our_batch(models["dropout as configured"], processor, rows, settings.device)

    for side in ("query", "product"):
        mask = batch[f"{side}_attention_mask"]
        computed = sum(_padded_lengths(models["dropout as configured"], mask))
        print(f"{side} tokens: {int(mask.sum()):,} real, {computed:,} computed in length groups, "
              f"{mask.numel():,} at the batch's width")

    steps = {name: _optimizer_step(lambda b, m=model: m(**b).loss, model, settings) for name, model in models.items()}
    for step in steps.values():
        step(batch)  # untimed: the first step touches its activations' memory
    samples = measure_interleaved({name: lambda s=step: s(batch) for name, step in steps.items()}, args.repeats,
                                  settings.device)
    for name, sample in samples.items():
        print(f"step, {name}: {sample.median_s:.2f} s (median of {args.repeats})")

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        steps["dropout as configured"](batch)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print("share of the step's CPU time:")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:TOP_OPERATORS]:
        print(f"  {event.key:28s} {100 * event.self_cpu_time_total / total:5.1f}%")


if __name__ == "__main__":
    main()

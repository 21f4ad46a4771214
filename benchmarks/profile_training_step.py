"""Where our text-only training step spends its time: the figures behind the text-only training analysis
in docs/performance.md.

On the training case's batch (32 attribute-derived pairs of the real catalogue, offline MiniLM) it prints
the text tokens the step computes against the texts' real tokens, the step time with the towers' dropout
masks gap-sampled (the default), drawn by torch, and with dropout switched off (interleaved, so all see the
same machine), the share of the default step's CPU time in the heaviest operators (torch.profiler), and
one attention layer of the product batch (forward and backward) with torch's sdpa with and without
dropout and with gap-sampled dropout:

    python benchmarks/profile_training_step.py              # about 1 minute on 2 cores
"""

import argparse
import contextlib

import torch
from bench_training import BATCH_SIZE, _optimizer_step, _our_batch, _padded_lengths, training_rows
from measure import measure_interleaved
from towers import Towers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from modeling_mmretrieval import speedups
from modeling_mmretrieval.data import load_catalogue
from modeling_mmretrieval.speedups.gap_sampled_dropout import GAP_SAMPLED_SDPA

TOP_OPERATORS = 6
DEFAULT = "gap-sampled dropout masks"
DEFAULT_AND_VARIANTS = (DEFAULT, "torch dropout masks", "dropout off")


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

    models = {name: towers.retrieval_model("text_only").train() for name in DEFAULT_AND_VARIANTS}
    speedups.apply_to_model(models["torch dropout masks"], gap_sampled_dropout=False)
    _without_dropout(models["dropout off"])
    batch, _ = _our_batch(models[DEFAULT], processor, rows, settings.device)

    for side in ("query", "product"):
        mask = batch[f"{side}_attention_mask"]
        computed = sum(_padded_lengths(models[DEFAULT], mask))
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
        steps[DEFAULT](batch)
    events = profiler.key_averages()
    total = sum(event.self_cpu_time_total for event in events)
    print("share of the step's CPU time:")
    for event in sorted(events, key=lambda event: -event.self_cpu_time_total)[:TOP_OPERATORS]:
        print(f"  {event.key:28s} {100 * event.self_cpu_time_total / total:5.1f}%")
    _time_one_attention_layer(models[DEFAULT], batch, args.repeats, settings.device)


def _time_one_attention_layer(model, batch: dict, repeats: int, device: torch.device) -> None:
    """Forward and backward of one attention layer at the product batch's width, by implementation."""
    config = model.config.text_config
    heads, mask = config.num_attention_heads, batch["product_attention_mask"].bool()
    shape = (mask.shape[0], heads, mask.shape[1], config.hidden_size // heads)
    query, key, value = (torch.randn(shape, requires_grad=True) for _ in range(3))
    allowed = mask[:, None, None, :]
    layer = model.text_model.encoder.layer[0].attention.self
    dropout = config.attention_probs_dropout_prob

    def forward_backward(implementation: str, p: float):
        def run():
            output, _ = ALL_ATTENTION_FUNCTIONS[implementation](layer, query, key, value, allowed, dropout=p)
            output.sum().backward()
        return run

    variants = {f"torch sdpa, dropout {dropout}": forward_backward("sdpa", dropout),
                "torch sdpa, no dropout": forward_backward("sdpa", 0.0),
                f"gap-sampled, dropout {dropout}": forward_backward(GAP_SAMPLED_SDPA, dropout)}
    samples = measure_interleaved(variants, repeats, device)
    print(f"one attention layer {tuple(shape)}, forward + backward:")
    for name, sample in samples.items():
        print(f"  {name:28s} {1e3 * sample.median_s:6.1f} ms")


if __name__ == "__main__":
    main()

"""FSDP2 per rank: memopt's plan with ``world_size`` against what the ranks measure, on CPU with gloo.

Each workload is trained by ``world`` processes (gloo), ``fully_shard`` on every block and on the root,
AdamW, each rank on its share of the batch (``-bf16``: with FSDP2's ``MixedPrecisionPolicy``, bf16 parameters
and fp32 reduction); and by one process unsharded on the whole batch in fp32, from the same initial weights. Per
rank: the steady-state step's peak measured by the profiler (``measure_steady_peak``), ``FSDPMemTracker``'s peak
for the same kind of step, memopt's prediction (``memopt.plan`` on the wrapped model and the rank's batch, in
the rank), and ZeRO-3's arithmetic for the model states (16 bytes per parameter over the ranks with fp32 Adam). Then a Llama-70B-shaped step planned for 8 ranks of the h100 preset
from shapes alone, and the longest sequence that fits 80 GB per rank.

    python benchmarks/fsdp.py             # ~5 min on 2 cores; writes fsdp.json and FSDP.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy

import memopt
from memopt import examples
from memopt.budget import format_bytes
from memopt.config import PlanConfig
from memopt.fsdp import _checkpointed
from memopt.measure import measure_steady_peak
from memopt.passes.sharding import default_sharding

HERE = Path(__file__).parent
LR = 1e-3


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.gelu(self.up(x)))


class ResidualMLP(nn.Module):
    """Blocks in a layer list and a classifier head: FSDP2's units are the blocks, the root holds the head."""

    def __init__(self, width: int = 256, depth: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(width) for _ in range(depth))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x), y)


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    model.loss_type = "ForCausalLM"
    return model


@dataclass(frozen=True)
class Workload:
    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int], tuple]  # the whole batch (every rank's share) from a seed
    policy: MixedPrecisionPolicy | None = None  # every unit's, under FSDP2


def _mlp_batch(seed: int, rows: int = 128) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 256, generator=generator), torch.randint(0, 10, (rows,), generator=generator)


def _llama_batch(seed: int) -> tuple:
    ids = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(seed))
    return ({"input_ids": ids, "labels": ids},)


WORKLOADS = {
    "mlp": Workload("mlp", ResidualMLP, _mlp_batch),
    "llama": Workload("llama", _llama, _llama_batch),
    # a batch whose activations outweigh the rank's share of the model: what the budget runs check
    "mlp-batch": Workload("mlp-batch", ResidualMLP, lambda seed: _mlp_batch(seed, 1024)),
    "mlp-batch-bf16": Workload("mlp-batch-bf16", ResidualMLP, lambda seed: _mlp_batch(seed, 1024),
                               MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)),
}


def share(batch: tuple, rank: int, world: int) -> tuple:
    """One rank's part of the batch: its slice of every tensor's first dimension, a tensor of its own (a view
    would hold the whole batch's storage)."""

    def part(value):
        if isinstance(value, dict):
            return {k: part(v) for k, v in value.items()}
        rows = value.shape[0] // world
        return value[rank * rows:(rank + 1) * rows].clone()

    return tuple(part(value) for value in batch)


def call(model: nn.Module, batch: tuple) -> torch.Tensor:
    if len(batch) == 1 and isinstance(batch[0], dict):
        return model(**batch[0]).loss
    return model(*batch)


def _shard(model: nn.Module, policy: MixedPrecisionPolicy | None = None) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    units = default_sharding(model, 1).units[:-1]
    modules = dict(model.named_modules())
    policy = policy or MixedPrecisionPolicy()
    for unit in units:
        fully_shard(modules[unit.name], mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def _plan(model: nn.Module, batch: tuple, optimizer: Any, **options) -> memopt.MemoryPlan:
    return memopt.plan(model, batch[0] if isinstance(batch[0], dict) else batch, optimizer=optimizer, **options)


def _rank(rank: int, world: int, name: str, steps: int, port: int, out: str, budget: int | None,
          step_in_backward: bool, measure: bool) -> None:
    """One rank: trains ``steps`` steps sharded (with ``memopt.compile`` under ``budget`` bytes per rank, if given,
    and ``step_in_backward``) and saves its shards, then measures more steps (on the first batch): the profiler's
    steady-state peak, and FSDPMemTracker's; writes its losses and figures."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        workload = WORKLOADS[name]
        torch.manual_seed(0)
        model = _shard(workload.build(), workload.policy)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        plan = _plan(model, share(workload.batch(0), rank, world), optimizer)  # (no batch left alive beside the step)
        runner = model if budget is None else memopt.compile(model, budget=budget, optimizer=optimizer,
                                                             step_in_backward=step_in_backward)
        losses: list[float] = []

        def step(seed: int) -> None:
            batch = share(workload.batch(seed), rank, world)  # held through the step, as a training loop holds it
            loss = call(runner, batch)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())

        def zero() -> None:
            optimizer.zero_grad(set_to_none=True)

        for seed in range(steps):
            step(seed)
            zero()
        torch.save({n: p.to_local().clone() for n, p in model.named_parameters()}, f"{out}/shards{rank}.pt")
        trained = list(losses)
        # a free made on one of gloo's threads reaches no profiler: the block counts as live to the end, and the
        # end does not reconcile with the scan (unaccounted bytes); of six measurements, the reconciled ones count
        tries = []
        for _ in range(6 if measure else 0):
            measured = measure_steady_peak(lambda: step(0), between=zero)
            zero()
            tries.append((measured.peak_bytes, measured.unaccounted_bytes))
        reconciled = [peak for peak, unaccounted in tries if unaccounted == 0]
        tracked = {}
        if measure:
            tracker = FSDPMemTracker(model, optimizer)
            with tracker:
                step(0)
            zero()
            tracked = {str(k).split(".")[-1].lower(): v for k, v in tracker.get_tracker_snapshot("peak")[
                torch.device("cpu")].items()}
        result = {"losses": trained, "measured_peak_bytes": max(reconciled) if reconciled else None,
                  "tries": tries, "tracker": tracked}
        plan = plan if budget is None else runner.plan
        result["plan"] = {"peak_bytes": plan.peak_bytes, "checkpointed": plan.checkpointed,
                          "selective": list(plan.selective)}
        torch.save(result, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _pair_rank(rank: int, world: int, name: str, port: int, out: str, rounds: int) -> None:
    """One rank of the pair: FSDP2 with every block under torch.utils.checkpoint, and memopt.compile on the same
    model sharded again, at the per-rank peak the first measured (the highest rank's); their steps timed in
    alternation, ``rounds`` times, in this process."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        workload = WORKLOADS[name]
        batch = share(workload.batch(0), rank, world)

        def trainer(budget: int | None) -> tuple[Callable[[], None], Callable[[], None], Any]:
            torch.manual_seed(0)
            model = _shard(workload.build(), workload.policy)
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
            if budget is None:  # per-block checkpointing, as a careful user wraps FSDP2's blocks
                for unit in default_sharding(model, 1).units[:-1]:
                    block = model.get_submodule(unit.name)
                    block.forward = _checkpointed(block.forward)
                runner = model
            else:  # planned to the byte: the same peak, with no headroom of memopt's own
                runner = memopt.compile(model, budget=budget, optimizer=optimizer, config=PlanConfig(headroom=0.0))

            def step() -> None:
                call(runner, batch).backward()
                optimizer.step()

            def zero() -> None:
                optimizer.zero_grad(set_to_none=True)

            step()
            zero()
            return step, zero, runner

        def peak(step: Callable[[], None], zero: Callable[[], None]) -> int:
            measured = [measure_steady_peak(step, between=zero) for _ in range(4)]
            zero()
            reconciled = [m.peak_bytes for m in measured if m.unaccounted_bytes == 0]
            highest = torch.tensor([float(max(reconciled) if reconciled else min(m.peak_bytes for m in measured))])
            dist.all_reduce(highest, op=dist.ReduceOp.MAX)
            return int(highest.item())

        # each peak measured with only its own model in the process; then both built again, to time in turns
        torch_peak = peak(*trainer(None)[:2])
        memopt_peak = peak(*trainer(torch_peak)[:2])
        torch_step, torch_zero, _ = trainer(None)
        memopt_step, memopt_zero, runner = trainer(torch_peak)
        times: dict[str, list[float]] = {"torch": [], "memopt": []}
        turns = [("torch", torch_step, torch_zero), ("memopt", memopt_step, memopt_zero)]
        for round_ in range(rounds):
            # (each side first in every other round: the step that runs first in a round measures slower)
            for label, step, zero in turns if round_ % 2 == 0 else reversed(turns):
                dist.barrier()
                started = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - started)
                zero()
        torch.save({"torch_peak": torch_peak, "memopt_peak": memopt_peak, "times": times,
                    "checkpointed": runner.plan.checkpointed, "selective": list(runner.plan.selective),
                    "predicted": runner.plan.peak_bytes},
                   f"{out}/pair{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_pair(name: str, world: int, rounds: int = 16) -> list[dict]:
    """Every rank's pair: peaks, step times, what memopt checkpointed (``_pair_rank``)."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_pair_rank, args=(world, name, _free_port(), out, rounds), nprocs=world)
        return [torch.load(f"{out}/pair{r}.pt") for r in range(world)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sharded(name: str, world: int, steps: int = 4, budget: int | None = None, step_in_backward: bool = False,
                measure: bool = True) -> tuple[list[dict], dict[str, torch.Tensor]]:
    """Every rank's results, and the full parameters after ``steps`` steps (the ranks' dim-0 shards joined);
    ``budget``: trained with ``memopt.compile`` under that many bytes per rank (and ``step_in_backward``);
    ``measure=False``: the training only."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_rank, args=(world, name, steps, _free_port(), out, budget, step_in_backward, measure),
                 nprocs=world)
        results = [torch.load(f"{out}/rank{r}.pt") for r in range(world)]
        shards = [torch.load(f"{out}/shards{r}.pt") for r in range(world)]
    return results, {n: torch.cat([s[n] for s in shards]) for n in shards[0]}


def run_unsharded(name: str, steps: int = 4) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The same training in one process on the whole batch: the losses and the parameters after it."""
    workload = WORKLOADS[name]
    torch.manual_seed(0)
    model = workload.build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for seed in range(steps):
        loss = call(model, workload.batch(seed))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def predicted(name: str, world: int, **options) -> memopt.MemoryPlan:
    """memopt's plan of one rank's step, as a rank plans it (``_rank``) without the ranks: the model wrapped with
    ``fully_shard`` on a fake process group of ``world`` ranks in this process, rank 0's batch."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    workload = WORKLOADS[name]
    batch = share(workload.batch(0), 0, world)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        torch.manual_seed(0)
        model = _shard(workload.build(), workload.policy)
        return _plan(model, batch, (torch.optim.AdamW, {"lr": LR}), **options)
    finally:
        dist.destroy_process_group()


def zero3_model_states(model: nn.Module, world: int) -> int:
    """ZeRO-3's arithmetic with fp32 Adam: 16 bytes per parameter (weight, gradient, two moments) over the ranks."""
    return 16 * sum(p.numel() for p in model.parameters()) // world


def plan_70b_mixed(world: int = 8, seq: int = 4096) -> dict:
    """The Llama-70B shape as torchtitan trains it: fp32 weights and AdamW state, ``fully_shard`` on every layer and
    the root with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, wrapped on the meta device over
    a fake process group of ``world`` ranks and planned for the h100 preset (no budget)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    made = examples.llama70b(seq=seq)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        model = _shard(made.build().to(torch.float32),
                       MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
        started = time.perf_counter()
        plan = memopt.plan(model, made.inputs(), optimizer=torch.optim.AdamW, device="h100", offload=False)
        seconds = time.perf_counter() - started
    finally:
        dist.destroy_process_group()
    return _planned(plan, world, seq, seconds)


def _planned(plan: memopt.MemoryPlan, world: int, seq: int, seconds: float) -> dict:
    """A 70B plan's figures as fsdp.json keeps them."""
    return {"world": world, "seq": seq, "seconds": seconds, "peak_bytes": plan.peak_bytes, "ledger": plan.ledger,
            "static": plan.static_ledger, "minimum_budget_bytes": plan.minimum.bytes,
            "minimum_where": plan.minimum.where, "peak_node": plan.peak_node, "graph_nodes": plan.graph_nodes}


def plan_70b(world: int = 8, seq: int = 4096, budget: str = "80GB") -> dict:
    """A Llama-70B-shaped step (bf16 weights, AdamW, batch 1 per rank) on the meta device, planned for ``world``
    ranks of the h100 preset with no budget at ``seq``; then the longest sequence (a multiple of 256) that fits
    ``budget`` per rank on ``world`` ranks, and on twice as many."""
    made = examples.llama70b(seq=seq)
    model = made.build()
    started = time.perf_counter()
    plan = memopt.plan(model, made.inputs(), optimizer=torch.optim.AdamW, device="h100", world_size=world,
                       offload=False)
    seconds = time.perf_counter() - started
    result = {**_planned(plan, world, seq, seconds), "parameters": sum(p.numel() for p in model.parameters()),
              "budget": budget, "largest": []}
    for ranks, start in ((world, 256), (2 * world, seq)):

        def plan_at(length: int, ranks: int = ranks) -> memopt.MemoryPlan:
            at = examples.llama70b(seq=length)
            return memopt.plan(at.build(), at.inputs(), optimizer=torch.optim.AdamW, device="h100", world_size=ranks,
                               offload=False, budget=budget)

        started = time.perf_counter()
        found = memopt.largest_fitting(plan_at, name="seq", start=start, step=256, limit=65536)
        result["largest"].append({
            "world": ranks, "seq": found.value, "tried": found.tried, "seconds": time.perf_counter() - started,
            "peak_bytes": found.plan.peak_bytes if found.plan else None,
            "recomputed": sum(d.action == "recompute" for d in found.plan.decisions) if found.plan else None})
        print(json.dumps(result["largest"][-1]), flush=True)
    return result


def sharded_rows(steps: int) -> list[dict]:
    """Each workload on 2 and 4 gloo ranks, eager FSDP2 (and memopt.compile under a budget on mlp-batch): the
    measured per-rank peaks against the prediction, FSDPMemTracker and ZeRO-3, and against unsharded training."""
    rows = []
    for name, workload in WORKLOADS.items():
        reference_losses, reference = run_unsharded(name, steps)
        for world in (2, 4):
            runs: list[tuple[int | None, bool]] = [(None, False)]
            if name.startswith("mlp-batch"):  # between the eager peak and every block's recomputed: some blocks, not all
                every_block = predicted(name, world, solver="blocks", budget=10**12).peak_bytes
                budget = (predicted(name, world).peak_bytes + every_block) // 2
                runs += [(budget, False), (budget, True)]
            for budget, step_in_backward in runs:
                results, params = run_sharded(name, world, steps, budget, step_in_backward)
                measured = [r["measured_peak_bytes"] for r in results]
                highest = max((m for m in measured if m is not None), default=None)
                peak = max(r["plan"]["peak_bytes"] for r in results)
                losses = [sum(r["losses"][i] for r in results) / world for i in range(steps)]
                rows.append({
                    "workload": name, "world": world, "budget_bytes": budget, "step_in_backward": step_in_backward,
                    "predicted_bytes": peak,
                    "measured_bytes": highest, "measured_by_rank": measured, "tries_by_rank": [r["tries"] for r in results],
                    "error": None if highest is None else (peak - highest) / highest,
                    "checkpointed": [list(r["plan"]["checkpointed"]) for r in results],
                    "selective": [r["plan"]["selective"] for r in results],
                    "tracker_bytes": max(r["tracker"]["total"] for r in results), "tracker": results[0]["tracker"],
                    "zero3_model_states_bytes": zero3_model_states(workload.build(), world),
                    "max_param_difference": max((params[n] - v).abs().max().item() for n, v in reference.items()),
                    "max_loss_difference": max(abs(a - b) for a, b in zip(losses, reference_losses)),
                })
                print(json.dumps(rows[-1], default=str), flush=True)
    return rows


def pairs(rounds: int = 16) -> list[dict]:
    """memopt.compile against FSDP2 with every block checkpointed, at the latter's measured per-rank peak."""
    found = []
    for world in (2, 4):
        ranks = run_pair("mlp-batch", world, rounds)
        found.append({"workload": "mlp-batch", "world": world, "rounds": rounds,
                      "torch_peak_bytes": ranks[0]["torch_peak"], "memopt_peak_bytes": ranks[0]["memopt_peak"],
                      "memopt_predicted_bytes": ranks[0]["predicted"], "checkpointed": list(ranks[0]["checkpointed"]),
                      "selective": ranks[0]["selective"],
                      "ratio_by_rank": [statistics.median(r["times"]["memopt"]) / statistics.median(r["times"]["torch"])
                                        for r in ranks],
                      "torch_median_s": statistics.median(ranks[0]["times"]["torch"])})
        print(json.dumps(found[-1]), flush=True)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--parts", default="rows,pairs,llama70b,llama70b-mixed",
                        help="what to run again (the rest is kept from fsdp.json): rows, pairs, llama70b, "
                             "llama70b-mixed")
    args = parser.parse_args()
    path = HERE / "fsdp.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(torch=torch.__version__, machine=platform.platform())
    run = {"rows": lambda: sharded_rows(args.steps), "pairs": pairs, "llama70b": plan_70b,
           "llama70b-mixed": plan_70b_mixed}
    for part in args.parts.split(","):
        data[part] = run[part]()
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")  # what is done so far, kept
    (HERE / "FSDP.md").write_text(report(data))


def _blocks(checkpointed: list[str], selective: list[str]) -> str:
    """The blocks a plan runs under torch's checkpoint, the selective ones marked."""
    return ", ".join(f"{path} (selective)" if path in selective else path for path in checkpointed)


def report(data: dict) -> str:
    lines = [
        "# FSDP2 per rank: predicted, measured, FSDPMemTracker, ZeRO-3", "",
        (f"Written by `python benchmarks/fsdp.py` (its docstring says how the runs are made); torch {data['torch']}, "
         "CPU, gloo, one thread per rank. A peak is one rank's steady-state step, the highest rank's, measured by "
         "the profiler (`measure_steady_peak`; of six measurements per rank, those whose end reconciles with a scan "
         "of the live tensors). Budget rows are `memopt.compile` on the FSDP2 model: FSDP2 runs the step, memopt "
         "runs the blocks it chose under `torch.utils.checkpoint` (selective: torch's selective activation "
         "checkpointing with memopt's policy, what the backward reads of the block's matmuls kept); their "
         "prediction is the rank's plan. The last "
         "two columns compare the parameters and mean losses after 4 training steps with the same training "
         "unsharded, in fp32 (`-bf16` rows train under FSDP2's `MixedPrecisionPolicy(param_dtype=bf16, "
         "reduce_dtype=fp32)`: their differences are bf16's)."), "",
        ("| workload | ranks | budget per rank | blocks memopt recomputes | memopt predicted | measured (profiler) "
         "| error | FSDPMemTracker | ZeRO-3 model states | max param diff | max loss diff |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        measured = "none reconciled" if r["measured_bytes"] is None else format_bytes(r["measured_bytes"])
        error = "" if r["error"] is None else f"{r['error']:+.2%}"
        budget = "eager FSDP2" if r["budget_bytes"] is None else format_bytes(r["budget_bytes"])
        if r.get("step_in_backward"):
            budget += ", step_in_backward"
        blocks = _blocks(r["checkpointed"][0], r.get("selective", [[]])[0])
        lines.append(f"| {r['workload']} | {r['world']} | {budget} | {blocks} | {format_bytes(r['predicted_bytes'])} | "
                     f"{measured} | {error} | {format_bytes(r['tracker_bytes'])} | "
                     f"{format_bytes(r['zero3_model_states_bytes'])} | {r['max_param_difference']:.2e} | "
                     f"{r['max_loss_difference']:.2e} |")
    if data.get("pairs"):
        lines += ["", "## At FSDP2 + per-block checkpointing's peak", "",
                  ("FSDP2 with every block under `torch.utils.checkpoint` (non-reentrant), measured; then "
                   "`memopt.compile` on the same model sharded again, with that peak as its budget (planned to the "
                   "byte: `PlanConfig(headroom=0.0)`). Step times taken in turns in the same processes, "
                   f"medians of {data['pairs'][0]['rounds']}, each first in every other round; the ratio is "
                   "memopt's time over torch's, per rank."), "",
                  "| workload | ranks | torch peak | memopt peak (measured) | predicted | memopt recomputes | time ratio |",
                  "|---|---|---|---|---|---|---|"]
        for p in data["pairs"]:
            ratios = ", ".join(f"{x:.3f}" for x in p["ratio_by_rank"])
            lines.append(f"| {p['workload']} | {p['world']} | {p['torch_peak_bytes']:,} B | "
                         f"{p['memopt_peak_bytes']:,} B | {p['memopt_predicted_bytes']:,} B | "
                         f"{_blocks(p['checkpointed'], p.get('selective', []))} | {ratios} |")
    big = data["llama70b"]
    lines += [
        "", f"## Llama-70B-shaped, {big['world']} ranks of the h100 preset, seq {big['seq']}, batch 1 per rank", "",
        (f"Planned from shapes alone in {big['seconds']:.1f} s ({big['graph_nodes']} graph nodes, "
         f"{big['parameters'] / 1e9:.1f}B parameters, bf16 weights and AdamW state, no budget). Predicted peak per "
         f"rank {format_bytes(big['peak_bytes'])} at `{big['peak_node']}`; no recompute plan peaks below "
         f"{format_bytes(big['minimum_budget_bytes'])} (at `{big['minimum_where']}`)."), "",
        "| category | at the peak |", "|---|---|",
    ]
    mixed = data.get("llama70b-mixed")
    if mixed is None:
        lines += [f"| {k} | {format_bytes(v)} |" for k, v in big["ledger"].items() if v]
    else:
        lines[-2:] = [
            (f"Beside it, the same shape as torchtitan trains it: fp32 weights and AdamW state, `fully_shard` with "
             "`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`, wrapped on the meta device over a fake "
             f"process group of {mixed['world']} ranks: planned in {mixed['seconds']:.1f} s, predicted peak per "
             f"rank {format_bytes(mixed['peak_bytes'])} at `{mixed['peak_node']}`, no recompute plan below "
             f"{format_bytes(mixed['minimum_budget_bytes'])} (at `{mixed['minimum_where']}`)."), "",
            "| category | bf16 weights: at the peak | fp32 weights, bf16 policy: at the peak |", "|---|---|---|"]
        lines += [f"| {k} | {format_bytes(v)} | {format_bytes(mixed['ledger'].get(k, 0))} |"
                  for k, v in big["ledger"].items() if v or mixed["ledger"].get(k)]
    lines += ["", (f"The longest sequence (a multiple of 256) whose step memopt plans under {big['budget']} per rank "
                   "(offload off):"), "",
              "| ranks | longest seq | its peak | recomputed activations | planned at | search |",
              "|---|---|---|---|---|---|"]
    for found in big["largest"]:
        tried = ", ".join(f"{v}{'' if ok else ' (no)'}" for v, ok in found["tried"])
        peak = "" if found["peak_bytes"] is None else format_bytes(found["peak_bytes"])
        lines.append(f"| {found['world']} | {found['seq'] or 'none'} | {peak} | {found['recomputed'] or ''} | "
                     f"{tried} | {found['seconds']:.0f} s |")
    lines += ["", ("The same from the shell: `memopt plan memopt.examples:llama70b --device h100 --world-size 16 "
                   f"--budget {big['budget']} --largest seq --step 256`.")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

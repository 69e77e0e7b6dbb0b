"""Train a small ResNet-style CNN with BatchNorm under a memory budget on CPU; check it against eager.

    python examples/vision_bn.py [--budget 90MiB] [--blocks 6]
    memopt plan examples/vision_bn.py:workload --arg blocks=6 --budget 90MiB --png plan.png

BatchNorm updates its running statistics in place: memopt never replays those
ops, so the statistics update once per step as in eager. The script trains an
eager twin from the same seed and checks that losses, gradients and running
statistics are bitwise equal, and prints the measured peak of each step.
"""

import argparse
import copy

import torch
from torch import nn

import memopt
from memopt.examples import Workload


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.body(x)).relu()


class SmallResNet(nn.Module):
    def __init__(self, blocks: int = 6, channels: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU())
        self.blocks = nn.ModuleList(Residual(channels) for _ in range(blocks))
        self.head = nn.Linear(channels, classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return nn.functional.cross_entropy(self.head(x.mean((2, 3))), labels)


def workload(blocks: int = 6, batch: int = 32) -> Workload:
    """The model this script trains, its batch (32x32 images, 10 classes) and its optimizer: the CLI's FACTORY."""

    def build() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return SmallResNet(blocks)

    def inputs() -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(1)
        return torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(0, 10, (batch,), generator=generator)

    return Workload("vision_bn", build, inputs, optimizer_cls=torch.optim.SGD,
                    optimizer_kwargs={"lr": 0.1, "momentum": 0.9},
                    description=f"SmallResNet, {blocks} blocks, batch {batch} at 32x32")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default=None, help="default: halfway from memopt's minimum to the eager peak")
    parser.add_argument("--blocks", type=int, default=6)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)

    made = workload(args.blocks)
    model = made.build()
    twin = copy.deepcopy(model)  # trained eagerly, for the comparison
    images, labels = made.inputs()
    optimizer, twin_optimizer = made.optimizer(model), made.optimizer(twin)
    eager = memopt.plan(model, (images, labels), optimizer=optimizer)
    if args.budget is None:
        try:
            memopt.plan(model, (images, labels), optimizer=optimizer, budget=1)
        except memopt.BudgetInfeasibleError as error:
            budget = (error.minimum + eager.peak_bytes) // 2
    else:
        budget = memopt.parse_budget(args.budget)
    print(f"{made.description}; SGD with momentum; eager step predicted at "
          f"{memopt.format_bytes(eager.peak_bytes)}, budget {memopt.format_bytes(budget)}")
    trained = memopt.compile(model, budget=budget, optimizer=optimizer)

    def step() -> torch.Tensor:
        loss = trained(images, labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def eager_step() -> torch.Tensor:
        loss = twin(images, labels)
        loss.backward()
        twin_optimizer.step()
        return loss.detach()

    # The first call plans the step, measuring kernels' scratch under a profiler of its own: measure_peak
    # measures a warm call. Both models take that step (step 0), with the same randomness.
    for take_step, seeded_optimizer in ((step, optimizer), (eager_step, twin_optimizer)):
        seeded_optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        take_step()
    failures = 0
    for number in range(1, args.steps + 1):
        optimizer.zero_grad(set_to_none=True)
        twin_optimizer.zero_grad(set_to_none=True)
        torch.manual_seed(number)
        measured = memopt.measure_peak(step)
        torch.manual_seed(number)
        expected = eager_step()
        same = torch.equal(measured.result, expected) and all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
        fits = measured.peak_bytes <= budget
        failures += (not same) + (not fits)
        print(f"step {number}: loss {measured.result.item():.4f} ({'equal to' if same else 'DIFFERS from'} eager, "
              f"weights and running statistics too), measured peak {memopt.format_bytes(measured.peak_bytes)} "
              f"({'under' if fits else 'OVER'} budget), predicted {memopt.format_bytes(trained.plan.peak_bytes)}")
    recomputed = [d for d in trained.plan.decisions if d.action == "recompute"]
    print(f"\nmemopt recomputes {len(recomputed)} of {len(trained.plan.decisions)} activations "
          f"({memopt.format_bytes(sum(d.bytes for d in recomputed))})")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Built-in workloads: models from configs with random weights, their inputs and optimizers.

Used by the README's first command, the benchmarks and the end-to-end tests.
Hugging Face models need `transformers` (the `examples` extra).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn


@dataclass(frozen=True)
class Workload:
    """A model, its example inputs and how it trains: everything a training step needs."""

    name: str
    build: Callable[[], nn.Module]  # fresh model with deterministic random weights
    inputs: Callable[[], tuple | dict]  # fresh example inputs
    loss_fn: Callable[..., torch.Tensor] | None = None  # None: the model returns the loss
    optimizer_cls: type[torch.optim.Optimizer] = torch.optim.AdamW
    optimizer_kwargs: dict[str, Any] = field(default_factory=lambda: {"lr": 1e-4})
    description: str = ""

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        return self.optimizer_cls(model.parameters(), **self.optimizer_kwargs)


class ResidualMLP(nn.Module):
    """`depth` blocks of x + W2 relu(W1 layernorm(x)), then a mean-squared loss head."""

    def __init__(self, width: int = 512, depth: int = 32, hidden_mult: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.LayerNorm(width),
                nn.Linear(width, width * hidden_mult),
                nn.ReLU(),
                nn.Linear(width * hidden_mult, width),
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = x + block(x)
        return x


def mse_to_zero(output: torch.Tensor) -> torch.Tensor:
    return output.float().pow(2).mean()


def _seeded(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def fresh() -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return build()

    return fresh


def _token_inputs(batch: int, seq: int, vocab: int) -> Callable[[], dict]:
    def fresh() -> dict:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        return {"input_ids": ids, "labels": ids.clone()}

    return fresh


def gpt2(layers: int = 6, width: int = 384, heads: int = 6, seq: int = 256, batch: int = 8,
         vocab: int = 8192, dropout: float = 0.0) -> Workload:
    """A GPT-2 language model from a config (random weights), trained on random tokens."""

    def build() -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=layers, n_embd=width, n_head=heads, n_positions=seq, vocab_size=vocab,
            bos_token_id=0, eos_token_id=0, use_cache=False,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
        )
        model = GPT2LMHeadModel(config)
        model.loss_type = "ForCausalLM"  # avoids a graph break on warning_once under Dynamo
        return model

    return Workload(
        name="gpt2", build=_seeded(build), inputs=_token_inputs(batch, seq, vocab),
        description=f"GPT-2, {layers} layers, d={width}, seq {seq}, batch {batch}, vocab {vocab}",
    )


def llama(layers: int = 4, width: int = 256, heads: int = 8, seq: int = 256, batch: int = 8,
          vocab: int = 8192, intermediate: int | None = None) -> Workload:
    """A Llama language model from a config (random weights), trained on random tokens."""

    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=intermediate or width * 8 // 3,
            vocab_size=vocab, max_position_embeddings=seq, use_cache=False,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
        model.loss_type = "ForCausalLM"
        return model

    return Workload(
        name="llama", build=_seeded(build), inputs=_token_inputs(batch, seq, vocab),
        description=f"Llama, {layers} layers, d={width}, seq {seq}, batch {batch}, vocab {vocab}",
    )


def llama7b(seq: int = 4096, batch: int = 1, layers: int = 32) -> Workload:
    """Llama-7B shape (32 layers, hidden 4096, 11008 MLP, vocab 32000), built on the meta device:
    it plans in fake mode and can never run here. ``layers`` deepens (or thins) the stack."""

    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            num_hidden_layers=layers, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
            intermediate_size=11008, vocab_size=32000, max_position_embeddings=seq, use_cache=False,
        )
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        model.loss_type = "ForCausalLM"
        return model

    def inputs() -> dict:
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": ids}

    return Workload(name="llama7b" if layers == 32 else f"llama7b-{layers}L", build=build, inputs=inputs,
                    description=f"Llama-7B shape{'' if layers == 32 else f' with {layers} layers'} on the meta "
                                f"device, seq {seq}, batch {batch}")


def mlp(width: int = 512, depth: int = 32, batch: int = 1024) -> Workload:
    """A residual MLP of `depth` blocks: activations and optimizer state both matter."""

    def inputs() -> tuple:
        return (torch.randn(batch, width, generator=torch.Generator().manual_seed(1)),)

    return Workload(
        name="mlp", build=_seeded(lambda: ResidualMLP(width, depth)), inputs=inputs, loss_fn=mse_to_zero,
        description=f"residual MLP, {depth} blocks of width {width}, batch {batch}",
    )


def tiny_gpt2() -> Workload:
    """The README's example: small enough to plan in seconds on a laptop."""
    return gpt2(layers=2, width=128, heads=4, seq=128, batch=4, vocab=2048)


BENCHMARK_WORKLOADS: dict[str, Callable[[], Workload]] = {"gpt2": gpt2, "llama": llama, "mlp": mlp}

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
    return _meta_llama(
        "llama7b" if layers == 32 else f"llama7b-{layers}L",
        f"Llama-7B shape{'' if layers == 32 else f' with {layers} layers'} on the meta device, seq {seq}, batch {batch}",
        seq, batch, None, num_hidden_layers=layers, hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
        intermediate_size=11008, vocab_size=32000, max_position_embeddings=seq)


def llama70b(seq: int = 4096, batch: int = 1, layers: int = 80) -> Workload:
    """Llama-3-70B's shape (80 layers, hidden 8192, 28672 MLP, 64 heads, 8 KV heads, vocab 128256) in bf16 on
    the meta device: planned from shapes only, one rank's batch (``memopt plan ... --world-size 8``)."""
    return _meta_llama(
        "llama70b" if layers == 80 else f"llama70b-{layers}L",
        f"Llama-70B shape in bf16 on the meta device, seq {seq}, batch {batch}",
        seq, batch, torch.bfloat16, num_hidden_layers=layers, hidden_size=8192, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, max_position_embeddings=max(seq, 8192))


def _meta_llama(name: str, description: str, seq: int, batch: int, dtype: torch.dtype | None,
                **config: int) -> Workload:
    """A Llama of ``config``'s shape on the meta device (in ``dtype``), with a ``batch`` x ``seq`` batch of tokens."""

    def build() -> nn.Module:
        from transformers import LlamaConfig, LlamaForCausalLM

        with torch.device("meta"):
            model = LlamaForCausalLM(LlamaConfig(**config, use_cache=False))
        if dtype is not None:
            model = model.to(dtype)
        model.loss_type = "ForCausalLM"
        return model

    def inputs() -> dict:
        ids = torch.zeros((batch, seq), dtype=torch.long, device="meta")
        return {"input_ids": ids, "labels": ids}

    return Workload(name=name, build=build, inputs=inputs, description=description)


def mlp(width: int = 512, depth: int = 32, batch: int = 1024) -> Workload:
    """A residual MLP of `depth` blocks: activations and optimizer state both matter."""

    def inputs() -> tuple:
        return (torch.randn(batch, width, generator=torch.Generator().manual_seed(1)),)

    return Workload(
        name="mlp", build=_seeded(lambda: ResidualMLP(width, depth)), inputs=inputs, loss_fn=mse_to_zero,
        description=f"residual MLP, {depth} blocks of width {width}, batch {batch}",
    )


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3x3 convolutions with batch norms, and a 1x1 projection when the shape changes."""

    def __init__(self, inputs: int, outputs: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Identity() if stride == 1 and inputs == outputs else nn.Sequential(
            nn.Conv2d(inputs, outputs, 1, stride=stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A CIFAR-style ResNet: a 3x3 stem, stages of basic blocks (each stage after the first halves the
    resolution), global average pooling and a linear classifier. `blocks` lists every block in order."""

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128), blocks_per_stage: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
                                  nn.ReLU())
        blocks, previous = [], widths[0]
        for stage, width in enumerate(widths):
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(previous, width, stride=2 if stage > 0 and index == 0 else 1))
                previous = width
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(previous, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(dim=(2, 3)))


def resnet_bn(batch: int = 64, image: int = 32, widths: tuple[int, ...] = (32, 64, 128), blocks_per_stage: int = 2,
              classes: int = 10) -> Workload:
    """A small ResNet with batch norms on random images, cross-entropy against random classes."""
    labels = torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(2))

    def inputs() -> tuple:
        return (torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1)),)

    def cross_entropy(logits: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, labels)

    return Workload(
        name="resnet_bn", build=_seeded(lambda: ResNet(tuple(widths), blocks_per_stage, classes)), inputs=inputs,
        loss_fn=cross_entropy,
        description=f"ResNet with batch norms, {len(widths)} stages of {blocks_per_stage} basic blocks, widths "
                    f"{'/'.join(map(str, widths))}, {image}x{image} images, batch {batch}, {classes} classes",
    )


def bert_mlm(layers: int = 4, width: int = 256, heads: int = 4, intermediate: int = 1024, seq: int = 256,
             batch: int = 8, vocab: int = 8192, dropout: float = 0.1, masked: float = 0.15) -> Workload:
    """BERT's masked language model from a config (random weights): random tokens, the loss on a seeded ~15%
    of the positions (labels -100 elsewhere)."""

    def build() -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM

        config = BertConfig(
            num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads, intermediate_size=intermediate,
            vocab_size=vocab, max_position_embeddings=seq, hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout, pad_token_id=0,
        )
        return BertForMaskedLM(config)

    def inputs() -> dict:
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        chosen = torch.rand(batch, seq, generator=generator) < masked
        return {"input_ids": ids, "labels": torch.where(chosen, ids, torch.full_like(ids, -100))}

    return Workload(
        name="bert_mlm", build=_seeded(build), inputs=inputs,
        description=f"BERT masked LM, {layers} layers, d={width}, seq {seq}, batch {batch}, vocab {vocab}, "
                    f"{masked:.0%} of positions scored, dropout {dropout}",
    )


def t5(layers: int = 3, width: int = 256, d_ff: int = 1024, heads: int = 4, seq: int = 256, target_seq: int = 64,
       batch: int = 8, vocab: int = 8192, dropout: float = 0.1) -> Workload:
    """T5 encoder-decoder from a config (random weights): `layers` encoder and `layers` decoder layers, random
    source tokens and random targets."""

    def build() -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        config = T5Config(
            num_layers=layers, num_decoder_layers=layers, d_model=width, d_kv=width // heads, d_ff=d_ff,
            num_heads=heads, vocab_size=vocab, dropout_rate=dropout, use_cache=False,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
        )
        return T5ForConditionalGeneration(config)

    def inputs() -> dict:
        generator = torch.Generator().manual_seed(1)
        return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
                "labels": torch.randint(0, vocab, (batch, target_seq), generator=generator)}

    return Workload(
        name="t5", build=_seeded(build), inputs=inputs,
        description=f"T5, {layers}+{layers} layers, d={width}, d_ff {d_ff}, seq {seq} -> {target_seq}, batch {batch}, "
                    f"vocab {vocab}, dropout {dropout}",
    )


def tiny_gpt2() -> Workload:
    """The README's example: small enough to plan in seconds on a laptop."""
    return gpt2(layers=2, width=128, heads=4, seq=128, batch=4, vocab=2048)


BENCHMARK_WORKLOADS: dict[str, Callable[[], Workload]] = {
    "gpt2": gpt2, "llama": llama, "mlp": mlp, "resnet_bn": resnet_bn, "bert_mlm": bert_mlm, "t5": t5,
}

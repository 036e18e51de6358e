"""The model families people actually train, as tiny LightningModules on synthetic data.

Each :class:`Pipeline` is one row of the conformance table (``test_pipelines.py``): a module
factory, a loader factory and the Trainer options that row trains with (precision, gradient
clipping). Every module computes its loss in :meth:`PipelineModule.loss` (the measurement
callbacks differentiate a silenced ``training_step``, which calls it), logs what a user would
log (``train_loss``, sometimes through ``log_dict`` or with ``on_epoch=True``) and configures
the optimizer that family is usually trained with.

Sizes are tiny (a fit of 8 steps takes about a second on one CPU thread), and the rows with
attention (1–4) take ``tiny=True`` for an instance small enough for a dense Hessian.
``transformers`` is imported only inside the Hugging Face factories (a test-only extra).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

N_SAMPLES = 32
BATCH = 8
SEQ = 8
VOCAB = 12


# -- data ---------------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def token_data(
    n: int = N_SAMPLES, seq: int = SEQ, vocab: int = VOCAB, seed: int = 0
) -> TensorDataset:
    """Sequences that count up by 1 or 2 (mod ``vocab``) from a random start: learnable by an LM."""
    g = _gen(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 3, (n, 1), generator=g)
    return TensorDataset((start + stride * torch.arange(seq)) % vocab)


def token_class_data(
    n: int = N_SAMPLES, seq: int = SEQ, vocab: int = VOCAB, classes: int = 3, seed: int = 0
) -> TensorDataset:
    """Random token sequences labelled by their sum modulo ``classes``."""
    g = _gen(seed)
    x = torch.randint(0, vocab, (n, seq), generator=g)
    return TensorDataset(x, x.sum(1) % classes)


def feature_seq_data(
    n: int = N_SAMPLES, seq: int = 6, dim: int = 4, classes: int = 3, seed: int = 0
) -> TensorDataset:
    """Gaussian feature sequences labelled by which third of the sequence has the largest mean."""
    g = _gen(seed)
    x = torch.randn(n, seq, dim, generator=g)
    assert seq % classes == 0
    return TensorDataset(x, x.mean(-1).reshape(n, classes, -1).mean(-1).argmax(1))


def image_data(n: int = N_SAMPLES, size: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    """3-channel ``size``x``size`` images labelled by their brightest quadrant."""
    g = _gen(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    h = size // 2
    quads = [x[..., :h, :h], x[..., :h, h:], x[..., h:, :h], x[..., h:, h:]]
    return TensorDataset(x, torch.stack([q.mean((1, 2, 3)) for q in quads], 1).argmax(1) % classes)


def vector_data(
    n: int = N_SAMPLES, dim: int = 10, classes: int = 3, seed: int = 0
) -> TensorDataset:
    g = _gen(seed)
    x = torch.randn(n, dim, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def loader(dataset: TensorDataset, batch_size: int = BATCH) -> DataLoader:
    """A shuffled loader (its order comes from the global torch RNG, seeded before each fit)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=True)


# -- the LightningModule shell ------------------------------------------------------------------
class PipelineModule(pl.LightningModule):
    """``training_step`` = ``loss(batch)`` plus the user's own logging; SGD unless overridden."""

    lr: float = 0.05

    def loss(self, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def _lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """nanoGPT's AdamW groups: weight decay on matrices, none on biases/norms/embedding rows."""
    decay = [p for p in module.parameters() if p.dim() >= 2]
    rest = [p for p in module.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


# -- 1. nn.MultiheadAttention classifier --------------------------------------------------------
class MHAClassifier(PipelineModule):
    lr = 1e-2

    def __init__(self, tiny: bool = False) -> None:
        super().__init__()
        dim_in, d, classes = (3, 4, 2) if tiny else (4, 8, 3)
        self.embed = nn.Linear(dim_in, d)
        self.attn = nn.MultiheadAttention(d, num_heads=2, batch_first=True)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(self.norm(h + a).mean(1))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(1) == y).float().mean()
        self.log_dict({"train_loss": loss, "train_acc": acc})
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def mha_data(tiny: bool = False) -> TensorDataset:
    if tiny:  # the float64 reference instance gets float64 features
        x, y = feature_seq_data(n=12, seq=4, dim=3, classes=2).tensors
        return TensorDataset(x.double(), y)
    return feature_seq_data()


# -- 2. nn.TransformerEncoderLayer causal LM ----------------------------------------------------
class EncoderLayerLM(PipelineModule):
    lr = 3e-3

    def __init__(self, tiny: bool = False) -> None:
        super().__init__()
        vocab, d, ff, seq = (6, 4, 8, 5) if tiny else (VOCAB, 8, 16, SEQ)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.02 * torch.randn(seq, d))
        self.layer = nn.TransformerEncoderLayer(
            d, nhead=2, dim_feedforward=ff, dropout=0.1, batch_first=True
        )
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(
            t, device=tokens.device, dtype=self.pos.dtype
        )
        h = self.layer(self.tok(tokens) + self.pos[:t], src_mask=mask, is_causal=True)
        return self.head(h)

    def loss(self, batch: Any) -> torch.Tensor:
        (tokens,) = batch
        return _lm_loss(self(tokens), tokens)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss)
        self.log("train_loss_epoch", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def lm_data(tiny: bool = False) -> TensorDataset:
    return token_data(n=12, seq=5, vocab=6) if tiny else token_data()


# -- 3. hand-written GPT block with F.scaled_dot_product_attention --------------------------------
class CausalSelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
            for z in self.qkv(x).split(c, dim=2)
        )
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True
        )
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(PipelineModule):
    """nanoGPT in miniature: token + position embeddings, pre-LN blocks, tied LM head."""

    lr = 3e-3

    def __init__(self, tiny: bool = False, layers: int = 1) -> None:
        super().__init__()
        vocab, d, seq = (6, 4, 5) if tiny else (VOCAB, 8, SEQ)
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads=2) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight  # weight tying

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok(tokens) + self.pos(pos)
        for block in self.blocks:
            h = block(h)
        return self.head(self.ln_f(h))

    def loss(self, batch: Any) -> torch.Tensor:
        (tokens,) = batch
        return _lm_loss(self(tokens), tokens)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(decay_groups(self, 0.1), lr=self.lr, betas=(0.9, 0.95))
        warmup = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 4))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}


# -- 4. Hugging Face transformers, from tiny configs (no weights downloaded) ---------------------
def _hf_kwargs() -> dict[str, Any]:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    minor = int(transformers.__version__.split(".")[1])
    # `attn_implementation` in a config: transformers >= 4.36
    return {"attn_implementation": "sdpa"} if (major, minor) >= (4, 36) else {}


class HFCausalLM(PipelineModule):
    """``GPT2LMHeadModel`` from a tiny ``GPT2Config``; the loss is the model's own (``labels=``)."""

    lr = 3e-3

    def __init__(self, tiny: bool = False) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        vocab, d, seq = (6, 4, 5) if tiny else (VOCAB, 16, SEQ)
        config = GPT2Config(
            n_layer=1, n_head=2, n_embd=d, vocab_size=vocab, n_positions=seq,
            bos_token_id=0, eos_token_id=0, **_hf_kwargs(),
        )  # fmt: skip
        self.model = GPT2LMHeadModel(config)
        # transformers' ForCausalLMLoss upcasts the logits with `.float()`, i.e. *down* to
        # float32 in a float64 model; the float64 reference instance takes the same shifted
        # cross-entropy from the logits instead
        self.labels_loss = not tiny

    def loss(self, batch: Any) -> torch.Tensor:
        (tokens,) = batch
        if self.labels_loss:
            return self.model(input_ids=tokens, labels=tokens).loss
        return _lm_loss(self.model(input_ids=tokens).logits, tokens)

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(decay_groups(self, 0.01), lr=self.lr)


class HFEncoderClassifier(PipelineModule):
    """``BertForSequenceClassification`` from a tiny ``BertConfig``, with an attention mask."""

    lr = 3e-3

    def __init__(self, tiny: bool = False) -> None:
        super().__init__()
        from transformers import BertConfig, BertForSequenceClassification

        vocab, d, seq = (6, 4, 5) if tiny else (VOCAB, 16, SEQ)
        config = BertConfig(
            vocab_size=vocab, hidden_size=d, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=2 * d, max_position_embeddings=seq, num_labels=3, **_hf_kwargs(),
        )  # fmt: skip
        self.model = BertForSequenceClassification(config)

    def loss(self, batch: Any) -> torch.Tensor:
        tokens, labels = batch
        mask = (tokens != self.model.config.pad_token_id).long()  # the masked SDPA path
        return self.model(input_ids=tokens, attention_mask=mask, labels=labels).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(decay_groups(self, 0.01), lr=self.lr)


def class_token_data(tiny: bool = False) -> TensorDataset:
    return token_class_data(n=12, seq=5, vocab=6) if tiny else token_class_data()


# -- 5. ResNet-style CNN ------------------------------------------------------------------------
class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)  # in-place residual add
        return self.relu(out)


class ResNet(PipelineModule):
    lr = 0.05

    def __init__(self, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True)
        )
        self.layer1 = BasicBlock(4, 4)
        self.layer2 = BasicBlock(4, 8, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(h), 1))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
        )


# -- 6. MLP with two parameter groups, trained in bf16-mixed ------------------------------------
class GroupedMLP(PipelineModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(10, 32), nn.LayerNorm(32), nn.GELU(), nn.Dropout(0.1),
            nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 3),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self) -> Any:
        weights = [p for n, p in self.named_parameters() if n.endswith("weight") and p.dim() == 2]
        others = [
            p for n, p in self.named_parameters() if not (n.endswith("weight") and p.dim() == 2)
        ]
        return torch.optim.AdamW(
            [
                {"params": weights, "lr": 3e-3, "weight_decay": 0.05},
                {"params": others, "lr": 1e-3, "weight_decay": 0.0},
            ]
        )


# -- 7. LSTM sequence classifier ----------------------------------------------------------------
class LSTMClassifier(PipelineModule):
    lr = 1e-2

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.lstm = nn.LSTM(8, 12, batch_first=True)
        self.head = nn.Linear(12, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(self.embed(tokens))
        return self.head(h[-1])

    def loss(self, batch: Any) -> torch.Tensor:
        tokens, y = batch
        return F.cross_entropy(self(tokens), y)

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor]:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return {"loss": loss}  # a dict, as many users return

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


# -- 8. torch.compile ---------------------------------------------------------------------------
def _mlp_encoder() -> nn.Sequential:
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())


class CompiledSubmodule(PipelineModule):
    """One submodule compiled (``self.encoder = torch.compile(...)``), the head eager."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.compile(_mlp_encoder())
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


class CompiledNet(PipelineModule):
    """The module's whole network compiled (``self.net = torch.compile(nn.Sequential(...))``)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.compile(nn.Sequential(_mlp_encoder(), nn.Linear(16, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)


@functools.cache
def compile_unsupported() -> str | None:
    """Why ``torch.compile`` cannot run here (``None``: it can)."""
    if not hasattr(torch, "compile"):
        return "torch.compile is not available in this torch"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile (dynamo) is not supported on this Python/platform"
        net = torch.compile(nn.Linear(2, 1))
        net(torch.randn(3, 2))
    except Exception as err:  # e.g. no C++ compiler for the inductor backend
        return f"torch.compile does not work on this machine: {type(err).__name__}: {err}"
    return None


# -- the table ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pipeline:
    id: str
    module: Callable[[], pl.LightningModule]
    data: Callable[[], TensorDataset]
    trainer: dict[str, Any] = field(default_factory=dict)
    unavailable: Callable[[], str | None] = lambda: None  # a reason to skip the row here
    needs: tuple[str, ...] = ()  # optional packages (``pytest.importorskip``)


PIPELINES: list[Pipeline] = [
    Pipeline("mha_classifier", MHAClassifier, mha_data),
    Pipeline("transformer_encoder_layer_lm", EncoderLayerLM, lm_data),
    Pipeline("sdpa_gpt", TinyGPT, lm_data),
    Pipeline("hf_gpt2_lm", HFCausalLM, lm_data, {"accumulate_grad_batches": 2}, needs=("transformers",)),
    Pipeline("hf_bert_classifier", HFEncoderClassifier, class_token_data, needs=("transformers",)),
    Pipeline("resnet_cnn", ResNet, image_data),
    Pipeline("mlp_param_groups_bf16", GroupedMLP, vector_data, {"precision": "bf16-mixed"}),
    # beyond the brief: "true" precision plugins convert the inputs too (64-true, bf16-true)
    Pipeline("mlp_64_true", GroupedMLP, vector_data, {"precision": "64-true"}),
    Pipeline("mlp_bf16_true", GroupedMLP, vector_data, {"precision": "bf16-true"}),
    Pipeline("lstm_classifier", LSTMClassifier, class_token_data, {"gradient_clip_val": 1.0}),
    Pipeline("compiled_submodule", CompiledSubmodule, vector_data, unavailable=compile_unsupported),
    Pipeline("compiled_net", CompiledNet, vector_data, unavailable=compile_unsupported),
]  # fmt: skip

#: rows 1-4 in a float64 instance small enough for a dense Hessian (``tiny=True``)
TINY: dict[str, tuple[Callable[..., PipelineModule], Callable[..., TensorDataset]]] = {
    "mha_classifier": (MHAClassifier, mha_data),
    "transformer_encoder_layer_lm": (EncoderLayerLM, lm_data),
    "sdpa_gpt": (TinyGPT, lm_data),
    "hf_gpt2_lm": (HFCausalLM, lm_data),
    "hf_bert_classifier": (HFEncoderClassifier, class_token_data),
}

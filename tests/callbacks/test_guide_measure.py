"""The example of ``docs/guides/write_a_measure.md`` runs as written and is right.

Its ``GradientCurvature`` logs ‖g‖ and gᵀHg/‖g‖² of the probe loss; both are checked against
autograd on the full probe in float64 (a dense Hessian of a tiny model).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

GUIDE = Path(__file__).parents[2] / "docs" / "guides" / "write_a_measure.md"


def _guide_class() -> type:
    text = GUIDE.read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    namespace: dict = {}
    exec(compile(blocks[0], str(GUIDE), "exec"), namespace)  # the class, as the guide has it
    return namespace["GradientCurvature"]


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        self.x = torch.randn(16, 3, dtype=torch.float64)
        self.y = torch.randint(0, 2, (16,))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(self.x, self.y)
        return torch.utils.data.DataLoader(data, batch_size=16)


def _reference(module: Tiny) -> tuple[float, float]:
    params = list(module.net.parameters())
    loss = nn.functional.cross_entropy(module.net(module.x), module.y)
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, params, create_graph=True)])
    rows = [torch.autograd.grad(g[i], params, retain_graph=True) for i in range(g.numel())]
    hessian = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in rows])
    g = g.detach()
    return float(g.norm()), float(g @ hessian @ g / (g @ g))


def test_the_guide_example_runs_and_matches_a_dense_reference(tmp_path: Path) -> None:
    cls = _guide_class()
    seen: dict[str, float] = {}

    class Recording(cls):  # type: ignore[misc, valid-type]
        def measure(self, ctx, due):
            out = super().measure(ctx, due)
            seen.update(out)
            seen["ref_norm"], seen["ref_curvature"] = _reference(ctx.pl_module)
            return out

    cb = Recording(every_n_steps=2, probe_size=16, strict=True)
    assert [c.title for c in cb.charts()] == ["Gradient", "Gradient curvature"]
    trainer = pl.Trainer(
        max_steps=3,
        callbacks=[cb],
        logger=pl.loggers.CSVLogger(tmp_path),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(Tiny())
    assert cb.skipped == 0
    assert abs(seen["grad_norm"] - seen["ref_norm"]) <= 1e-12 * seen["ref_norm"]
    assert abs(seen["curvature"] - seen["ref_curvature"]) <= 1e-10 * abs(seen["ref_curvature"])
    logged = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "landscape/gradient_curvature/curvature" in logged

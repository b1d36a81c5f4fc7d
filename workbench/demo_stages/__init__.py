"""Stages of ``vtw demo`` (``make demo``), run in order on the built-in shapes data.

Each stage module defines ``run(ctx: DemoContext) -> StageResult``. A stage reads what earlier stages
produced from ``ctx.artifacts`` (e.g. ``"classifier_dir"``, ``"tokenizer_dir"``, ``"shards_dir"``,
``"gpt_ckpt"``) and adds its own. The whole demo must finish in under 15 minutes on 2 CPU cores, so
every stage has a fixed, small step budget (``ctx.quick`` shrinks it further for tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DemoContext:
    out_dir: Path  # runs/demo
    quick: bool = False  # tiny budgets (used by the end-to-end test), never for reported numbers
    seed: int = 0
    artifacts: dict[str, Any] = field(default_factory=dict)  # paths shared between stages


@dataclass
class StageResult:
    name: str
    metrics: dict[str, Any]  # flat JSON-able numbers, merged into runs/demo/metrics.json
    report_md: str  # a Markdown section for runs/demo/report.md (may link PNGs relative to out_dir)
    artifacts: dict[str, Any] = field(default_factory=dict)


# Order of the stages; a stage whose module is missing is reported, not silently skipped.
STAGES: list[str] = [
    "workbench.demo_stages.classifier",  # evaluation classifier (tiny ViT)
    "workbench.demo_stages.vqgan",  # tiny VQGAN + token shards
    "workbench.demo_stages.gpt",  # tiny class-conditional GPT, sample grid, class accuracy + Frechet distance
    "workbench.demo_stages.speculative",  # drafter + plain vs LANTERN side by side
]

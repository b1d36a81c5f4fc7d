"""``vtw demo``: the main job on built-in data (what ``make demo`` runs).

Runs the stages listed in :data:`workbench.demo_stages.STAGES` in order and leaves in ``--out``
(default ``runs/demo``): PNG pictures, ``report.md``, ``metrics.json`` and checkpoints.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="tiny budgets (smoke test; numbers are meaningless)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stages", nargs="*", default=None,
                        help="run only these stages (names like classifier, vqgan, gpt, speculative)")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from workbench.demo_stages import STAGES, DemoContext
    from workbench.runtime import atomic_write_json, atomic_write_text

    console = Console()
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = DemoContext(out_dir=out_dir, quick=args.quick, seed=args.seed)
    selected = STAGES
    if args.stages:
        known = {module.rsplit(".", 1)[-1]: module for module in STAGES}
        unknown = [name for name in args.stages if name not in known]
        if unknown:
            raise SystemExit(f"vtw demo: unknown --stages {unknown}; known: {list(known)}")
        selected = [known[name] for name in args.stages]

    metrics: dict[str, object] = {}
    sections: list[str] = []
    started = time.perf_counter()
    for index, module_name in enumerate(selected, 1):
        name = module_name.rsplit(".", 1)[-1]
        console.rule(f"[bold]demo stage {index}/{len(selected)}: {name}")
        stage_start = time.perf_counter()
        stage = importlib.import_module(module_name)
        result = stage.run(ctx)
        seconds = time.perf_counter() - stage_start
        ctx.artifacts.update(result.artifacts)
        metrics.update({f"{result.name}/{key}": value for key, value in result.metrics.items()})
        metrics[f"{result.name}/seconds"] = round(seconds, 1)
        sections.append(result.report_md.strip() + f"\n\n_Stage time: {seconds:.0f} s._\n")
        console.print(f"[green]{name} done in {seconds:.0f} s:[/green] " +
                      ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items()))
        # write after every stage so a partial run still leaves a readable report
        atomic_write_json(out_dir / "metrics.json", metrics)
        atomic_write_text(out_dir / "report.md", _report(sections, ctx, time.perf_counter() - started))
    total = time.perf_counter() - started
    metrics["total_seconds"] = round(total, 1)
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_text(out_dir / "report.md", _report(sections, ctx, total))
    console.rule(f"[bold green]demo finished in {total / 60:.1f} min: {out_dir}/report.md")
    return 0


def _report(sections: list[str], ctx, seconds: float) -> str:
    import torch

    from workbench.benchutil import cpu_model

    header = (
        "# Vision-token workbench demo\n\n"
        f"Built-in procedural shapes data, seed {ctx.seed}{' (quick smoke budget)' if ctx.quick else ''}; "
        f"{seconds / 60:.1f} min on {torch.get_num_threads()} CPU threads of {cpu_model()} "
        f"(torch {torch.__version__}). The stages train for fixed wall-clock budgets, so a slower CPU gets "
        "fewer steps and lower figures.\n\n"
    )
    return header + "\n\n".join(sections) + "\n"

"""Evaluate vision-token dropping on a LLaVA (the tiny shapes-VQA model): answer accuracy, vision
tokens per LM layer, prefill FLOPs (total and attributable to vision tokens), prefill answers/s,
KV-cache bytes. Shared by ``vtw compress llava`` and ``benchmarks/bench_mustdrop.py``.

FLOPs: ``FlopCounterMode`` under the math SDPA kernel over the whole prefill (vision tower,
projector, LM, last-position LM head) of a fixed evaluation batch, divided by its size. "Vision
FLOPs" = prefill FLOPs minus the FLOPs of the same prompts run text-only through the same code, so
it includes the tower and every LM layer's cost of the vision tokens (and the drop rules' overhead);
the tower + projector's own count is reported beside it, and the LM's share is the difference (the
accounting of MustDrop's and FastV's FLOPs figures, whose CLIP towers are a few % of LLaVA-1.5-7B).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn

from compression import fastv, mustdrop, pitome
from compression import llava_runner as R
from compression.flops import count_flops, llama_prefill_flops
from compression.patching import remove_patch

# Thresholds chosen by benchmarks/bench_mustdrop.py's calibration (300 val questions; tau 0.7 / 0.8 / 0.9 x
# gamma = alpha 0.01-0.3) for the seed-0 model of configs/llava_deep_shapes.yaml (32 LM layers, 98.0% test
# accuracy): the best val accuracy among the settings cutting >= 87% of the LM's vision FLOPs. Seeds 1 and 2 of
# the same recipe chose (0.9, 0.3) and (0.7, 0.03): recalibrate for any other checkpoint (the 16-layer
# llava_tiny_shapes.yaml model's were tau 0.95, gamma = alpha = 0.01); LLaVA-1.5's released settings are
# LLAVA15_MUSTDROP.
TINY_MUSTDROP = dict(merge_threshold=0.7, global_thr=0.05, individual_thr=0.05, key_ratio=0.08)
# LLaVA-1.5-7B: the released 64-token TextVQA setting (MustDrop scripts/v1_5/eval/textvqa_64.sh; unify_compress.md 3.2).
LLAVA15_MUSTDROP = dict(merge_threshold=0.8, global_thr=0.011, individual_thr=0.01, key_ratio=0.08)
LLAVA15_PROMPT = "USER: <image>\n{question} ASSISTANT:"  # LLaVA-1.5's conversation template (vicuna_v1)


@dataclass
class LlavaArm:
    name: str
    method: str  # none | mustdrop | fastv | pitome | oracle
    mustdrop: mustdrop.MustDropConfig | None = None
    fastv: fastv.FastVConfig | None = None
    pitome_ratio: float | None = None
    oracle_layer: int = 2  # method "oracle": the LM layer after which only object tokens stay
    extra: dict[str, Any] = field(default_factory=dict)

    def plan(self, num_layers: int, objects: Tensor | None = None) -> R.DropPlan | None:
        """``objects`` (B, grid^2) bool (patches showing an object) is only read by the oracle arm."""
        if self.method == "mustdrop":
            return mustdrop.make_plan(self.mustdrop, num_layers)
        if self.method == "fastv":
            return fastv.make_plan(self.fastv)
        if self.method == "oracle":
            if objects is None:
                raise ValueError("the oracle arm needs the object patches of the batch (VQAData.objects)")
            return oracle_plan(self.oracle_layer, objects)
        return None


def patch_for(model: nn.Module, arm: LlavaArm) -> None:
    """Leave ``model`` as ``arm`` needs it: PiToMe patched into the vision tower, or no patch."""
    remove_patch(model)
    if arm.method == "pitome":
        pitome.patch(model, ratio=arm.pitome_ratio, prop_attn=True)


def oracle_plan(layer: int, objects: Tensor) -> R.DropPlan:
    """Reference arm (not a method): after LM layer ``layer`` keep exactly the vision tokens whose patch
    shows an object (from the scene's coverage), drop every background token. Tells whether the model
    needs only the object tokens (then a rule that finds them loses nothing) or reads the background
    too. Needs vision tokens in raster order with their original positions (no stage-1 merging)."""

    def rule(li: int, probs: Tensor, ctx: dict[str, Tensor]) -> Tensor:
        is_vis = (ctx["kind"] == R.VISION) & ctx["valid"]
        first = ctx["pos"].masked_fill(~is_vis, 1 << 30).min(1, keepdim=True).values  # position of patch 0
        patch = (ctx["pos"] - first).clamp(0, objects.shape[1] - 1)  # (B, L) patch index of each token
        on_object = objects.to(patch.device).gather(1, patch)
        return ctx["valid"] & (~is_vis | on_object)

    return R.DropPlan(drop_layers=(layer,), rule=rule)


@dataclass
class VQAData:
    pixel_values: Tensor  # (N, 3, H, W)
    prompts: list[Tensor]
    answers: Tensor  # (N,)
    kinds: Tensor  # (N,)
    objects: Tensor | None = None  # (N, grid^2) bool: the patch shows part of an object (coverage >= 0.1)


def load_vqa(model_dir: str, split: str, num_samples: int, seed: int = 0) -> VQAData:
    import json
    from pathlib import Path

    from compression.tiny_llava import ShapesVQA

    info = json.loads((Path(model_dir) / "tiny_llava.json").read_text())["config"]
    n_img = (info["image_size"] // info["patch_size"]) ** 2
    ds = ShapesVQA(split, num_samples, info["image_size"], n_img, seed=seed, object_scale=info.get("object_scale", 1.0))
    ds.shapes.build_cache()
    items = [ds[i] for i in range(len(ds))]
    return VQAData(torch.stack([it["pixel_values"] for it in items]),
                   [it["input_ids"][: it["prompt_len"]] for it in items],
                   torch.tensor([it["answer"] for it in items]), torch.tensor([it["kind"] for it in items]),
                   torch.stack([it["object_patches"] for it in items]))  # (N, grid^2)


def _batches(data: VQAData, batch_size: int):
    for i in range(0, len(data.prompts), batch_size):
        objects = data.objects[i:i + batch_size] if data.objects is not None else None
        yield data.pixel_values[i:i + batch_size], data.prompts[i:i + batch_size], objects


def _lm_analytic_flops(model: nn.Module, tokens_per_layer: list[int]) -> int:
    cfg = model.config.text_config
    return llama_prefill_flops(tokens_per_layer, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                               cfg.num_key_value_heads or cfg.num_attention_heads, cfg.vocab_size)


_TEXT_FLOPS: dict[tuple[str, int], float] = {}


def _text_only_flops(model: nn.Module, prompt: Tensor) -> float:
    """FLOPs of the prompt's text-only prefill (no vision token). They depend only on the LM's shapes and
    the prompt's length, not on the arm, so they are counted once per LM configuration and length."""
    key = (model.config.text_config.to_json_string(), len(prompt))
    if key not in _TEXT_FLOPS:
        _TEXT_FLOPS[key] = count_flops(R.prefill, model, None, [prompt], None, R.empty_vision(model, 1))[0]
    return _TEXT_FLOPS[key]


def evaluate_llava_arm(model: nn.Module, arm: LlavaArm, data: VQAData, batch_size: int = 50, repeats: int = 5,
                       flops_batch: int = 64, decode_tokens: int = 2) -> dict[str, Any]:
    num_layers = len(R.parts(model)["lm"].layers)
    patch_for(model, arm)
    objects = data.objects

    def plan_for(lo: int, hi: int) -> R.DropPlan | None:
        return arm.plan(num_layers, objects[lo:hi] if objects is not None else None)

    try:
        preds, vis_in, vis_out, layer_counts, kv = [], [], [], [], []
        with torch.inference_mode():
            for b, (px, prompts, _) in enumerate(_batches(data, batch_size)):
                plan = plan_for(b * batch_size, b * batch_size + len(prompts))
                toks, out = R.generate(model, px, prompts, plan, max_new_tokens=decode_tokens)
                preds.append(toks[:, 0])
                vis_in.append(out.vision_in.float())
                vis_out.append(out.vision_out.float())
                layer_counts.append(torch.tensor(out.vision_tokens) * len(prompts))
                kv.append(R.kv_bytes(out.cache))
        preds = torch.cat(preds)
        n = len(data.prompts)
        per_layer = (torch.stack(layer_counts).sum(0) / n).tolist()
        flops = text_flops = tower_flops = lm_analytic = 0  # per sample (batch 1: no padding), summed over prompts
        image_id = R.parts(model)["image_token_id"]
        for i in range(min(flops_batch, n)):
            px, pr, plan = data.pixel_values[i:i + 1], data.prompts[i:i + 1], plan_for(i, i + 1)
            sample_flops, out = count_flops(R.prefill, model, px, pr, plan)
            flops += sample_flops
            text_flops += _text_only_flops(model, pr[0])
            tower_flops += count_flops(R.encode_images, model, px, plan)[0]  # tower + projector
            n_text = int((pr[0] != image_id).sum())
            lm_analytic += _lm_analytic_flops(model, [n_text + round(v) for v in out.vision_tokens])
        flops_batch = min(flops_batch, n)
        aps = latency_ms = float("nan")
        if repeats > 0:
            px, prompts, plan = data.pixel_values[:batch_size], data.prompts[:batch_size], plan_for(0, batch_size)
            with torch.inference_mode():
                R.prefill(model, px, prompts, plan)  # warm-up
                times = []
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    R.prefill(model, px, prompts, plan)
                    times.append(time.perf_counter() - t0)
            aps = len(prompts) / statistics.median(times)
            with torch.inference_mode():  # batch-1 latency (no padding), median over samples
                lat = []
                for i in range(min(10, n)):
                    plan = plan_for(i, i + 1)
                    t0 = time.perf_counter()
                    R.prefill(model, data.pixel_values[i:i + 1], data.prompts[i:i + 1], plan)
                    lat.append(time.perf_counter() - t0)
            latency_ms = 1e3 * statistics.median(lat)
    finally:
        remove_patch(model)
    acc_kind = {}
    from compression.tiny_llava import QUESTIONS

    for k, name in enumerate(QUESTIONS):
        sel = data.kinds == k
        if sel.any():
            acc_kind[f"acc_{name}"] = float((preds[sel] == data.answers[sel]).float().mean()) * 100
    return {
        "arm": arm.name, "method": arm.method,
        "acc": float((preds == data.answers).float().mean()) * 100, **acc_kind,
        "vis_tokens_in": float(torch.cat(vis_in).mean()), "vis_tokens_final": float(torch.cat(vis_out).mean()),
        "vis_tokens_layer_mean": sum(per_layer) / len(per_layer),
        "vis_tokens_per_layer": ",".join(f"{c:.1f}" for c in per_layer),
        "gflops_prefill": flops / flops_batch / 1e9, "gflops_vision": (flops - text_flops) / flops_batch / 1e9,
        "gflops_tower": tower_flops / flops_batch / 1e9,
        "gflops_lm_vision": (flops - text_flops - tower_flops) / flops_batch / 1e9,
        "gflops_lm": (flops - tower_flops) / flops_batch / 1e9, "gflops_lm_analytic": lm_analytic / flops_batch / 1e9,
        "kv_kib_per_sample": sum(kv) / n / 1024, "answers_per_s": aps, "prefill_ms_b1": latency_ms, **arm.extra,
    }


def time_prefill_interleaved(model: nn.Module, arms: list[LlavaArm], data: VQAData, batch_size: int = 50,
                             rounds: int = 7) -> list[float]:
    """Prefill answers/s of each arm on the first ``batch_size`` prompts, timed round-robin: every round
    runs one prefill per arm, the first round warms up, the median over the other rounds counts. A slow
    drift of a noisy machine then hits every arm alike, unlike arms timed minutes apart."""
    num_layers = len(R.parts(model)["lm"].layers)
    px, prompts = data.pixel_values[:batch_size], data.prompts[:batch_size]
    objects = data.objects[:batch_size] if data.objects is not None else None
    times: list[list[float]] = [[] for _ in arms]
    try:
        for r in range(rounds + 1):
            for i, arm in enumerate(arms):
                patch_for(model, arm)
                plan = arm.plan(num_layers, objects)
                with torch.inference_mode():
                    t0 = time.perf_counter()
                    R.prefill(model, px, prompts, plan)
                    elapsed = time.perf_counter() - t0
                if r:
                    times[i].append(elapsed)
    finally:
        remove_patch(model)
    return [len(prompts) / statistics.median(t) for t in times]


def add_relative(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = next(r for r in rows if r["method"] == "none")
    for r in rows:
        r["vision_flops_cut_%"] = 100 * (1 - r["gflops_vision"] / base["gflops_vision"])
        r["lm_vision_flops_cut_%"] = 100 * (1 - r["gflops_lm_vision"] / base["gflops_lm_vision"])
        r["prefill_flops_cut_%"] = 100 * (1 - r["gflops_prefill"] / base["gflops_prefill"])
        r["acc_drop"] = base["acc"] - r["acc"]
        r["prefill_speedup"] = r["answers_per_s"] / base["answers_per_s"] if base["answers_per_s"] else None
        r["b1_speedup"] = base["prefill_ms_b1"] / r["prefill_ms_b1"] if r["prefill_ms_b1"] else None
    return rows


def default_arms(num_layers: int, md: dict[str, Any] | None = None, pitome_ratio: float = 0.75,
                 methods: tuple[str, ...] = ("none", "mustdrop", "fastv", "pitome"), stages: str = "123") -> list[LlavaArm]:
    md = {**TINY_MUSTDROP, **(md or {})}
    arms = []
    if "none" in methods:
        arms.append(LlavaArm("none", "none"))
    if "mustdrop" in methods:
        base = mustdrop.MustDropConfig(**md)
        if stages == "123":
            arms.append(LlavaArm("mustdrop s1", "mustdrop", replace(base, stage2=False, stage3=False)))
            arms.append(LlavaArm("mustdrop s1+s2", "mustdrop", replace(base, stage3=False)))
        arms.append(LlavaArm(f"mustdrop s{'+s'.join(stages)}", "mustdrop",
                             replace(base, stage1="1" in stages, stage2="2" in stages, stage3="3" in stages)))
    if "pitome" in methods:
        arms.append(LlavaArm(f"pitome rho={pitome_ratio}", "pitome", pitome_ratio=pitome_ratio))
    return arms


def llava15_inputs(processor: Any, images: list[Any], questions: list[str]) -> tuple[Tensor, list[Tensor]]:
    """LLaVA-1.5 prompts through its Hugging Face processor: (pixel_values (B, 3, H, W), one prompt id
    tensor per question, unpadded; the processor expands ``<image>`` into the placeholder run)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images but {len(questions)} questions")
    enc = processor(images=images, text=[LLAVA15_PROMPT.format(question=q) for q in questions],
                    return_tensors="pt", padding=True)
    prompts = [ids[mask.bool()] for ids, mask in zip(enc["input_ids"], enc["attention_mask"])]
    return enc["pixel_values"], prompts


def ask_llava(model: nn.Module, processor: Any, images: list[Any], questions: list[str], arms: list[LlavaArm],
              max_new_tokens: int = 32) -> list[dict[str, Any]]:
    """Greedy answers of a LLaVA-1.5 (any HF ``LlavaForConditionalGeneration`` with a processor) to each
    (image, question) under every arm, through the same runner as the tiny model's evaluation. Rows:
    arm, answers, vision tokens fed to the LM / kept at the end / mean per LM layer, wall seconds of the
    prefill + decoding, KV-cache KiB per answer."""
    num_layers = len(R.parts(model)["lm"].layers)
    weight = R.parts(model)["lm"].embed_tokens.weight
    px, prompts = llava15_inputs(processor, images, questions)
    px, prompts = px.to(weight.device, weight.dtype), [p.to(weight.device) for p in prompts]
    tokenizer = getattr(processor, "tokenizer", processor)
    eos = tokenizer.eos_token_id
    rows = []
    try:
        for arm in arms:
            patch_for(model, arm)
            t0 = time.perf_counter()
            with torch.inference_mode():
                tokens, out = R.generate(model, px, prompts, arm.plan(num_layers), max_new_tokens=max_new_tokens)
            seconds = time.perf_counter() - t0
            answers = []
            for row in tokens.tolist():
                if eos is not None and eos in row:
                    row = row[: row.index(eos)]
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            rows.append({"arm": arm.name, "method": arm.method, "answers": answers,
                         "vis_tokens_in": float(out.vision_in.float().mean()),
                         "vis_tokens_final": float(out.vision_out.float().mean()),
                         "vis_tokens_layer_mean": sum(out.vision_tokens) / len(out.vision_tokens),
                         "seconds": seconds, "kv_kib_per_sample": R.kv_bytes(out.cache) / 1024 / len(prompts)})
    finally:
        remove_patch(model)
    return rows


def _llava15_request(args: Any) -> tuple[list[Any], list[str]]:
    """The images and questions of ``--image`` / ``--question``, checked before any weight is loaded."""
    from PIL import Image

    if not args.image or not args.question:
        raise SystemExit(f"{args.ckpt} is a LLaVA-1.5 directory: give --image and --question (the shapes-VQA "
                         "evaluation is for the tiny LLaVA)")
    questions = args.question * len(args.image) if len(args.question) == 1 else args.question
    if len(questions) != len(args.image):
        raise SystemExit(f"--question: give one question, or one per --image ({len(args.image)}), got {len(args.question)}")
    images = []
    for path in args.image:
        try:
            images.append(Image.open(path).convert("RGB"))
        except (OSError, ValueError) as err:
            raise SystemExit(f"--image {path}: cannot read it as an image ({err})") from err
    return images, questions


def _run_llava15(args: Any, loaded: Any, images: list[Any], questions: list[str]) -> int:
    """``vtw compress llava --ckpt <LLaVA-1.5 dir> --image ... --question ...``: answers per method."""
    import json
    from pathlib import Path

    model = loaded.model
    num_layers = len(R.parts(model)["lm"].layers)
    md = {**LLAVA15_MUSTDROP, **_mustdrop_overrides(args)}
    methods = tuple(["none"] + [m for m in args.method if m != "none"])
    arms = default_arms(num_layers, md, args.ratio, methods, args.stages)
    if "fastv" in args.method:
        keep = args.fastv_keep or 64  # FastV's and MustDrop's 64-token LLaVA-1.5 setting
        arms.append(LlavaArm(f"fastv K={args.fastv_layer} keep={keep}", "fastv", fastv=fastv.FastVConfig(args.fastv_layer, keep)))
    rows = ask_llava(model, loaded.tokenizer, images, questions, arms, args.max_new_tokens)
    for r in rows:
        print(f"{r['arm']:<24} tokens in {r['vis_tokens_in']:.0f} / per layer {r['vis_tokens_layer_mean']:.1f} / final "
              f"{r['vis_tokens_final']:.0f}  {r['seconds']:.2f} s")
        for image, answer in zip(args.image, r["answers"]):
            print(f"    {Path(image).name}: {answer}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"ckpt": args.ckpt, "images": args.image, "questions": questions, "mustdrop": md, "rows": rows}
    tmp = out / "answers.json.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(out / "answers.json")
    print("saved", out / "answers.json")
    return 0


def _mustdrop_overrides(args: Any) -> dict[str, float]:
    md = {}
    for name in ("merge_threshold", "global_thr", "individual_thr"):
        if getattr(args, name, None) is not None:
            md[name] = getattr(args, name)
    return md


def run_llava_command(args: Any) -> int:
    from pathlib import Path

    from compression.tiny_llava import check_llava_dir, load_llava
    from workbench.benchutil import save_table

    if not Path(args.ckpt).exists():
        raise SystemExit(f"--ckpt {args.ckpt} does not exist (train: vtw fit --config configs/llava_deep_shapes.yaml)")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = getattr(args, "device", "cpu")
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[getattr(args, "dtype", "float32")]
    if check_llava_dir(args.ckpt):  # the tiny shapes-VQA LLaVA
        if getattr(args, "image", None):
            raise SystemExit("--image / --question are for a LLaVA-1.5 directory; the tiny LLaVA is evaluated on its "
                             "shapes-VQA test split")
        if device != "cpu" or dtype != torch.float32:
            raise SystemExit("--device / --dtype are for a LLaVA-1.5 directory; the tiny LLaVA is evaluated on CPU in fp32")
        request = None
    else:
        request = _llava15_request(args)  # bad input fails here, before the weights load
    loaded = load_llava(args.ckpt, dtype=dtype)
    if not loaded.tiny:
        if device != "cpu":
            loaded.model.to(device)
        return _run_llava15(args, loaded, *request)
    model = loaded.model
    data = load_vqa(args.ckpt, "test", args.num_samples)
    num_layers = len(R.parts(model)["lm"].layers)
    md = _mustdrop_overrides(args)
    methods = tuple(["none"] + [m for m in args.method if m != "none"])
    arms = default_arms(num_layers, md, args.ratio, methods, args.stages)
    rows = []
    for arm in arms:
        rows.append(evaluate_llava_arm(model, arm, data, args.batch_size, args.repeats))
        print(f"{arm.name:<24} acc {rows[-1]['acc']:.1f}  vision GFLOPs {rows[-1]['gflops_vision']:.4f}  "
              f"tokens/layer {rows[-1]['vis_tokens_layer_mean']:.1f}")
    if "fastv" in args.method:
        full = rows[0]["vis_tokens_in"]
        target = next((r for r in reversed(rows) if r["method"] == "mustdrop"), None)
        keep = args.fastv_keep or (fastv.budget_matched_keep(target["vis_tokens_layer_mean"], full, num_layers,
                                                             args.fastv_layer) if target else 16)
        arm = LlavaArm(f"fastv K={args.fastv_layer} keep={keep}", "fastv", fastv=fastv.FastVConfig(args.fastv_layer, keep))
        rows.append(evaluate_llava_arm(model, arm, data, args.batch_size, args.repeats))
        arms.append(arm)
        print(f"{arm.name:<24} acc {rows[-1]['acc']:.1f}  vision GFLOPs {rows[-1]['gflops_vision']:.4f}")
    if args.repeats > 0:  # speed-ups from one round-robin loop over the arms (a noisy machine drifts)
        for row, aps in zip(rows, time_prefill_interleaved(model, arms, data, args.batch_size, args.repeats)):
            row["answers_per_s_alone"], row["answers_per_s"] = row["answers_per_s"], aps
    add_relative(rows)
    out = Path(args.out)
    save_table(out.name, rows, {"ckpt": args.ckpt, "num_samples": args.num_samples, "batch_size": args.batch_size},
               root=out.parent)
    if len(rows) > 2:
        plot_llava(rows, out / "acc_vs_flops.png")
        print("plot:", out / "acc_vs_flops.png")
    return 0


def plot_llava(rows: list[dict[str, Any]], path: Any, title: str = "tiny LLaVA shapes-VQA") -> None:
    import matplotlib

    matplotlib.use("Agg")
    from pathlib import Path

    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    markers = {"none": "k*", "mustdrop": "o", "fastv": "s", "pitome": "^", "oracle": "kD"}
    for method in markers:
        rs = sorted((r for r in rows if r["method"] == method), key=lambda r: r["gflops_lm_vision"])
        if rs:
            ax.plot([r["gflops_lm_vision"] * 1e3 for r in rs], [r["acc"] for r in rs],
                    markers[method] + ("-" if len(rs) > 1 else ""),
                    label=method + (" (object tokens only)" if method == "oracle" else ""), markersize=7)
    ax.set_xlabel("LM MFLOPs on vision tokens / answer (prefill, FlopCounterMode)")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)

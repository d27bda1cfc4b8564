"""Cost model at DUNE's scale: FLOPs counted on the real module graphs, converted to H100 time and storage.

    .venv/bin/python tools/cost_model.py --json docs/results/cost_model.json

What is counted (``torch.utils.flop_counter.FlopCounterMode`` on meta tensors: no weights are allocated and
nothing is computed, so ViT-L costs no memory; a module whose ops fail on meta is counted on CPU, batch 1):

- each DUNE teacher (``dune_cache.teachers.create_teacher``, random weights) forward at its shared-grid
  resolution (``dune_cache.teachers.geometry.resolve_geometry``) for student 336 and 448;
- the student (``dune_student.model.student.Student``, DUNE's ViT-B/14 with 4 registers) with one projector per
  teacher (``dune_student.model.heads.TeacherHeads``): ``transformer`` (DUNE) and ``ladder`` (UNIC), forward and
  backward, separately;
- the timm models of the published throughput figures used as a cross-check.

``FlopCounterMode`` counts matrix products, convolutions and attention (2 FLOPs per multiply-add); it counts
no element-wise op (norms, GELU, softmax, RoPE, resizing, the loss, the optimiser). The distillation loss
(``dune_student.loss.distill.teacher_losses``) has no matrix product, so it adds 0 counted FLOPs; on meta tensors it
cannot run (autocast has no meta device), so the backward pass is driven by a sum of the projected tokens,
which gives the same matrix-product gradients. Everything the tool derives from counted FLOPs (images/s,
GPU-hours, bytes/s) is *derived* under the utilisation stated in the output; every external figure carries
its source.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from dune_cache.teachers.geometry import resolve_geometry
from dune_cache.teachers import create_teacher, get_spec
from dune_student.config import HeadConfig, StudentConfig
from dune_student.model.heads import TeacherHeads
from dune_student.model.student import Student
from dune_student.training.trainer import Distiller

REPO = Path(__file__).resolve().parents[1]

# ---- DUNE's recipe (naver/dune at commit DUNE_COMMIT) -------------------------------------------------------
DUNE_COMMIT = "afad549fa695a773670275ff97d6abf955a60259"
DUNE_TEACHERS = ("dinov2_vitl14_reg4", "mast3r", "multihmr")
STUDENT_PATCH = 14
STUDENT_RESOLUTIONS = (336, 448)
EPOCH_SIZE = 1_281_167          # main_dune.py --epoch_size default; README: "an epoch by 1281167 images"
BATCH_PER_GPU = 128             # main_dune.py --batch_size_per_gpu default (README uses 128 at 448 too)
DUNE_GPUS = 4                   # naver/dune issue #1: "With 4 H100"
DUNE_PHASES = (                 # (student resolution, epochs, days on 4 H100 per naver/dune issue #1)
    (336, 100, 4.0),
    (448, 50, 3.0),
)
DATASET_IMAGES = 20_700_000     # README: "19 datasets with roughly 20.7M images"

# ---- GPU peaks (dense tensor-core bf16/fp16 with fp32 accumulation), TFLOP/s ---------------------------------
H100_SXM_BF16_TFLOPS = 989.4    # glennklockwood.com/garden/processors/h100 (NVIDIA Hopper whitepaper)
A100_BF16_TFLOPS = 312.0        # glennklockwood.com/garden/processors/A100 (NVIDIA A100 datasheet)
RTX4090_FP16_FP32ACC_TFLOPS = 165.2  # gigagpu.com/?p=34220 and waredb.com/processor/nvidia-geforce-rtx-4090

TIMM_COMMIT = "90cae8c5ab83d2d7e23b1fb2bab1559bfdcbc7e9"  # huggingface/pytorch-image-models, results/*pt291*
TIMM_TRAIN_COMMIT = "c865028c34fc05cc7deea8e753b30d8cd1952591"  # its train CSV (pt112, RTX 3090)
NEMO_VIT_URL = ("https://docs.nvidia.com/nemo-framework/user-guide/latest/MultimodalModels/"
                "VisionLanguageFoundation/Vit/Perf.html")

# ---- measured compression ratios (vs raw float16) ------------------------------------------------------------
ENCODINGS_JSON = "docs/results/bench_encodings_steps300.json"  # docs/benchmarks.md "Feature encodings on real features"
RATIO_TEACHER = "dinov2_vits14"  # the ViT teacher of that benchmark (DUNE's teachers are ViTs)
BLOSC_ZSTD5_RATIO_448 = 1.254    # docs/benchmarks.md "Lossless codecs on real features": DINOv2-S/14, 32x32 grid


@dataclass(frozen=True)
class PublishedThroughput:
    """One published throughput figure: ``samples_per_s`` per GPU of ``timm_model`` at ``img_size``."""

    source: str
    gpu: str
    peak_tflops: float | None   # dense bf16/fp16 tensor peak with fp32 accumulation; None: not cited
    timm_model: str             # the timm architecture the FLOPs are counted on
    img_size: int
    mode: str                   # "infer" (forward) | "train" (forward + backward)
    samples_per_s: float
    note: str = ""


def _timm_csv(name: str, commit: str) -> str:
    return f"huggingface/pytorch-image-models@{commit}:results/{name}"


_INFER_4090 = _timm_csv("benchmark-infer-amp-nchw-pt291-cu128-4090.csv", TIMM_COMMIT)
_TRAIN_3090 = _timm_csv("benchmark-train-amp-nchw-pt112-cu113-rtx3090.csv", TIMM_TRAIN_COMMIT)
_4090, _4090_PEAK = "RTX 4090", RTX4090_FP16_FP32ACC_TFLOPS
PUBLISHED = (
    PublishedThroughput(_INFER_4090, _4090, _4090_PEAK, "vit_base_patch16_224", 224, "infer", 2992.79),
    PublishedThroughput(_INFER_4090, _4090, _4090_PEAK, "vit_large_patch16_224", 224, "infer", 954.12),
    PublishedThroughput(_INFER_4090, _4090, _4090_PEAK, "vit_large_patch16_384", 384, "infer", 312.48),
    PublishedThroughput(_INFER_4090, _4090, _4090_PEAK, "vit_large_patch14_dinov2", 518, "infer", 114.56),
    PublishedThroughput(_TRAIN_3090, "RTX 3090", None, "vit_base_patch16_224", 224, "train", 390.86),
    PublishedThroughput(_TRAIN_3090, "RTX 3090", None, "vit_large_patch16_224", 224, "train", 117.08),
    PublishedThroughput(NEMO_VIT_URL, "H100 80GB (DGX)", H100_SXM_BF16_TFLOPS, "vit_giant_patch14_224", 224, "train",
                        1428 / 8, "1 DGX node = 8 GPUs: 1428 samples/s per node; NeMo's 'ViT g/14' assumed to be "
                                  "timm's vit_giant_patch14_224 (width 1408, depth 40, MLP 6144), not verified"),
    PublishedThroughput(NEMO_VIT_URL, "A100 80GB (DGX)", A100_BF16_TFLOPS, "vit_giant_patch14_224", 224, "train",
                        693 / 8, "1 DGX node = 8 GPUs: 693 samples/s per node; same architecture assumption"),
)


# ---- FLOP counting ---------------------------------------------------------------------------------------------
def count_flops(run: Callable[[], None]) -> int:
    """FLOPs (2 per multiply-add) of the matrix products, convolutions and attention ``run()`` executes."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return int(counter.get_total_flops())


def _on_meta_or_cpu(count_on: Callable[[str, int], int], batch: int) -> int:
    """``count_on(device, batch) / batch`` on meta; on CPU with batch 1 if an op has no meta kernel."""
    try:
        return count_on("meta", batch) // batch
    except (NotImplementedError, RuntimeError):
        with torch.no_grad():
            return count_on("cpu", 1)


def teacher_forward_flops(name: str, resolution: tuple[int, int], batch: int = 2) -> int:
    """Forward FLOPs per image of registered teacher ``name`` (random weights) on ``resolution`` (H, W) input."""

    def count_on(device: str, n: int) -> int:
        with torch.device(device):
            teacher = create_teacher(name)
            pixels = torch.zeros(n, 3, *resolution)
        return count_flops(lambda: teacher(pixels))

    return _on_meta_or_cpu(count_on, batch)


@dataclass(frozen=True)
class StepFlops:
    """Per-sample FLOPs of a student step: student + projectors forward, and the backward pass."""

    forward: int
    backward: int

    @property
    def total(self) -> int:
        return self.forward + self.backward


def student_step_flops(student_cfg: StudentConfig, head_kind: str, resolution: int,
                       teachers: dict[str, tuple[int, tuple[int, int]]], batch: int = 2) -> StepFlops:
    """Per-sample forward and backward FLOPs of student + ``head_kind`` projectors at ``resolution`` (square).

    teachers: name -> (teacher dim ``D_t``, target grid ``(h, w)``), as ``TeacherHeads`` takes them.
    """

    def count_on(device: str, n: int) -> tuple[int, int]:
        with torch.device(device):
            student = Student(student_cfg, device=device)
            heads = TeacherHeads(student, teachers, HeadConfig(kind=head_kind))
            model = Distiller(student, heads, return_blocks=heads.needs_blocks)
            pixels = torch.zeros(n, 3, resolution, resolution)
        outputs: dict = {}
        forward = count_flops(lambda: outputs.update(model(pixels)))
        surrogate = sum(cls.float().sum() + patch.float().sum() for cls, patch in outputs.values())
        backward = count_flops(surrogate.backward)
        return forward, backward

    try:
        forward, backward = count_on("meta", batch)
        return StepFlops(forward // batch, backward // batch)
    except (NotImplementedError, RuntimeError):
        forward, backward = count_on("cpu", 1)
        return StepFlops(forward, backward)


def timm_flops(model_name: str, img_size: int, mode: str, batch: int = 2) -> int:
    """Per-sample FLOPs of timm ``model_name`` (its default head) at ``img_size``: forward, or forward+backward."""
    with torch.device("meta"):
        model = timm.create_model(model_name, pretrained=False, img_size=img_size)
        pixels = torch.zeros(batch, 3, img_size, img_size)
    if mode == "infer":
        return count_flops(lambda: model(pixels)) // batch
    out: list[torch.Tensor] = []
    forward = count_flops(lambda: out.append(model(pixels)))
    return (forward + count_flops(out[0].float().sum().backward)) // batch


def analytic_vit_forward_flops(tokens: int, patches: int, dim: int, depth: int, mlp_hidden: int,
                               patch: int) -> int:
    """Matrix-product FLOPs of a plain ViT forward: patch embedding, then ``depth`` blocks over ``tokens``
    tokens (qkv + proj: 4·D², MLP: 2·D·H per token; attention q·kᵀ and a·v: 2·N²·D), 2 FLOPs per MAC."""
    embed = 2 * patches * dim * 3 * patch * patch
    per_block = 2 * tokens * (4 * dim * dim + 2 * dim * mlp_hidden) + 2 * 2 * tokens * tokens * dim
    return embed + depth * per_block


# ---- arithmetic ------------------------------------------------------------------------------------------------
def samples_per_s(flops_per_sample: float, peak_tflops: float, mfu: float) -> float:
    """Samples per second of one GPU sustaining ``mfu`` of ``peak_tflops`` on ``flops_per_sample`` each."""
    return peak_tflops * 1e12 * mfu / flops_per_sample


def gpu_hours(items: float, flops_per_item: float, peak_tflops: float, mfu: float) -> float:
    """GPU-hours to process ``items`` of ``flops_per_item`` FLOPs each at ``mfu`` of ``peak_tflops``."""
    return items * flops_per_item / (peak_tflops * 1e12 * mfu) / 3600.0


def implied_mfu(items: float, flops_per_item: float, hours: float, peak_tflops: float) -> float:
    """Utilisation that processing ``items`` in ``hours`` GPU-hours means (derived)."""
    return items * flops_per_item / (hours * 3600.0 * peak_tflops * 1e12)


def dune_phase_samples(epochs: float, epoch_size: int, global_batch: int) -> int:
    """Samples of one DUNE phase: ``iters = ceil(epochs·epoch_size / batch)``, rounded up to even (main_dune.py)."""
    iters = math.ceil(epochs * epoch_size / global_batch)
    iters += iters % 2
    return iters * global_batch


def feature_bytes_per_image(grid: tuple[int, int], dim: int, bytes_per_value: int = 2, views: int = 0) -> int:
    """Raw bytes one teacher's targets take per image: (CLS + h·w patch tokens) · D · bytes, for the image
    and its ``views`` extra cached views."""
    return (1 + grid[0] * grid[1]) * dim * bytes_per_value * (1 + views)


def measured_ratios(path: Path, teacher: str) -> dict[str, float]:
    """Encoding name -> measured size ratio vs raw float16 for ``teacher`` in a ``bench_encodings`` JSON."""
    rows = json.loads(path.read_text())["rows"]
    return {row["encoding"]: row["teachers"][teacher]["ratio_vs_fp16"] for row in rows}


# ---- the report ------------------------------------------------------------------------------------------------
def teacher_table(resolutions: tuple[int, ...]) -> dict:
    """teacher -> student resolution -> geometry and forward FLOPs per image (counted)."""
    table: dict = {}
    for name in DUNE_TEACHERS:
        spec = get_spec(name)
        table[name] = {}
        for res in resolutions:
            geometry = resolve_geometry(spec, student_patch=STUDENT_PATCH, student_resolution=res)
            prefix = 0 if spec.cls_source == "mean_patch" else 1 + spec.num_registers  # CLS, registers
            tokens = geometry.grid[0] * geometry.grid[1] + prefix
            table[name][str(res)] = {
                "input": list(geometry.resolution), "grid": list(geometry.grid), "embed_dim": spec.embed_dim,
                "tokens_in_blocks": tokens,
                "forward_gflops": teacher_forward_flops(name, geometry.resolution) / 1e9,
            }
    return table


def student_table(resolutions: tuple[int, ...], teachers: dict) -> dict:
    """head kind -> student resolution -> per-sample forward/backward GFLOPs (counted)."""
    cfg = StudentConfig(arch="vit_base", patch_size=STUDENT_PATCH, num_registers=4)
    table: dict = {}
    for kind in ("transformer", "ladder"):
        table[kind] = {}
        for res in resolutions:
            heads = {t: (v[str(res)]["embed_dim"], tuple(v[str(res)]["grid"])) for t, v in teachers.items()}
            step = student_step_flops(cfg, kind, res, heads)
            table[kind][str(res)] = {"forward_gflops": step.forward / 1e9, "backward_gflops": step.backward / 1e9,
                                     "fwd_bwd_gflops": step.total / 1e9}
    return table


def throughput_table(teachers: dict, students: dict, peak: float, train_mfu: float, infer_mfu: float) -> dict:
    """Live and cached step costs, speedups and derived H100 rates per head kind and resolution."""
    out: dict = {}
    for kind in ("transformer", "ladder"):
        out[kind] = {}
        for res in map(str, STUDENT_RESOLUTIONS):
            student = students[kind][res]["fwd_bwd_gflops"] * 1e9
            teacher = sum(teachers[t][res]["forward_gflops"] for t in DUNE_TEACHERS) * 1e9
            cached_s = 1.0 / samples_per_s(student, peak, train_mfu)
            live_s = cached_s + 1.0 / samples_per_s(teacher, peak, infer_mfu)
            out[kind][res] = {
                "cached_step_gflops": student / 1e9, "live_step_gflops": (student + teacher) / 1e9,
                "speedup_equal_mfu": (student + teacher) / student,
                "speedup_at_assumed_mfus": live_s / cached_s,
                "cached_samples_per_s_per_h100": 1.0 / cached_s, "live_samples_per_s_per_h100": 1.0 / live_s,
            }
    return out


def dune_recipe_table(steps: dict, teachers: dict, peak: float, train_mfu: float, infer_mfu: float,
                      views: tuple[int, ...]) -> dict:
    """DUNE's two phases: samples, reported H100-hours, implied MFU, predicted live/cached costs (derived)."""
    global_batch = BATCH_PER_GPU * DUNE_GPUS
    phases, live_total, cached_total = [], 0.0, 0.0
    for res, epochs, days in DUNE_PHASES:
        r = str(res)
        samples = dune_phase_samples(epochs, EPOCH_SIZE, global_batch)
        reported = days * 24 * DUNE_GPUS
        live = steps["transformer"][r]
        live_flops, cached_flops = live["live_step_gflops"] * 1e9, live["cached_step_gflops"] * 1e9
        teacher_flops = live_flops - cached_flops
        phase = {
            "student_resolution": res, "epochs": epochs, "samples": samples,
            "passes_over_dataset": samples / DATASET_IMAGES,
            "reported_h100_hours": reported,
            "implied_mfu_live": implied_mfu(samples, live_flops, reported, peak),
            "predicted_live_h100_hours": samples / live["live_samples_per_s_per_h100"] / 3600.0,
            "predicted_cached_training_h100_hours": samples / live["cached_samples_per_s_per_h100"] / 3600.0,
            "cached_training_h100_hours_at_dune_efficiency": reported * cached_flops / live_flops,
            "break_even_extra_views": samples / DATASET_IMAGES - 1,
            "extraction_h100_hours": {
                str(k): gpu_hours(DATASET_IMAGES * (k + 1), teacher_flops, peak, infer_mfu) for k in views},
            "cached_total_h100_hours_at_dune_efficiency": {
                str(k): reported * (samples * cached_flops + DATASET_IMAGES * (k + 1) * teacher_flops)
                / (samples * live_flops) for k in views},
        }
        phases.append(phase)
        live_total += reported
        cached_total += phase["predicted_cached_training_h100_hours"]
    totals = {
        "reported_h100_hours": live_total,
        "implied_mfu_live": sum(p["implied_mfu_live"] * p["reported_h100_hours"] for p in phases) / live_total,
        "predicted_live_h100_hours": sum(p["predicted_live_h100_hours"] for p in phases),
        "predicted_cached_training_h100_hours": cached_total,
        "cached_total_h100_hours": {
            str(k): cached_total + sum(p["extraction_h100_hours"][str(k)] for p in phases) for k in views},
        "cached_total_h100_hours_at_dune_efficiency": {
            str(k): sum(p["cached_total_h100_hours_at_dune_efficiency"][str(k)] for p in phases) for k in views},
    }
    return {"source": f"naver/dune@{DUNE_COMMIT}: README.md 'Training models', main_dune.py (--epoch_size "
                      f"{EPOCH_SIZE}, --batch_size_per_gpu {BATCH_PER_GPU}, iters = ceil(epochs*epoch_size/batch) "
                      "rounded to even); https://github.com/naver/dune/issues/1 ('With 4 H100 ... 336 ... ~4 days "
                      "... 448 ... another ~3 days')",
            "gpus": DUNE_GPUS, "global_batch": global_batch, "dataset_images": DATASET_IMAGES,
            "phases": phases, "totals": totals}


def storage_table(teachers: dict, steps: dict, ratios: dict[str, float], views: tuple[int, ...]) -> dict:
    """Bytes per image per teacher, whole-cache TB and GB/s per GPU/node at the cached rate, per encoding."""
    out: dict = {}
    for res in map(str, STUDENT_RESOLUTIONS):
        raw = {t: feature_bytes_per_image(tuple(v[res]["grid"]), v[res]["embed_dim"]) for t, v in teachers.items()}
        per_sample = sum(raw.values())
        rate = steps["transformer"][res]["cached_samples_per_s_per_h100"]
        out[res] = {
            "fp16_bytes_per_image_per_teacher": raw,
            "fp16_bytes_per_sample_3_teachers": per_sample,
            "encodings": {
                name: {
                    "ratio_vs_fp16": ratio,
                    "bytes_per_sample": per_sample / ratio,
                    "cache_tb": {str(k): DATASET_IMAGES * per_sample * (1 + k) / ratio / 1e12 for k in views},
                    "gb_per_s_per_gpu": rate * per_sample / ratio / 1e9,
                    "gb_per_s_per_8gpu_node": 8 * rate * per_sample / ratio / 1e9,
                } for name, ratio in ratios.items()},
        }
    return out


def cross_check_table(peak_h100: float) -> list[dict]:
    """Each published figure with the FLOPs counted on its timm model: achieved TFLOP/s and implied MFU (derived)."""
    rows = []
    for ref in PUBLISHED:
        flops = timm_flops(ref.timm_model, ref.img_size, ref.mode)
        achieved = ref.samples_per_s * flops / 1e12
        rows.append({**asdict(ref), "gflops_per_sample": flops / 1e9, "achieved_tflops": achieved,
                     "implied_mfu": achieved / ref.peak_tflops if ref.peak_tflops else None,
                     "h100_samples_per_s_at_same_mfu":
                         peak_h100 * 1e12 * achieved / ref.peak_tflops / flops if ref.peak_tflops else None})
    return rows


def build_report(args: argparse.Namespace) -> dict:
    """Every section of the JSON report."""
    resolutions = STUDENT_RESOLUTIONS
    teachers = teacher_table(resolutions)
    for name, per_res in teachers.items():
        spec = get_spec(name)
        for entry in per_res.values():
            patches = entry["grid"][0] * entry["grid"][1]
            analytic = analytic_vit_forward_flops(entry["tokens_in_blocks"], patches, spec.embed_dim, 24, 4096,
                                                  spec.patch_size)
            entry["analytic_gflops"] = analytic / 1e9
            entry["extraction_images_per_s_per_h100"] = samples_per_s(entry["forward_gflops"] * 1e9, args.peak_tflops,
                                                                      args.infer_mfu)
    students = student_table(resolutions, teachers)
    steps = throughput_table(teachers, students, args.peak_tflops, args.train_mfu, args.infer_mfu)
    ratios = {"fp16-raw": 1.0, "blosc-zstd5 (32x32 grid)": BLOSC_ZSTD5_RATIO_448,
              **measured_ratios(REPO / args.encodings_json, RATIO_TEACHER)}
    views = tuple(args.views)
    return {
        "command": "python tools/cost_model.py " + " ".join(args.argv),
        "versions": {"torch": torch.__version__, "timm": timm.__version__},
        "assumptions": {
            "peak_tflops": args.peak_tflops,
            "peak_source": "H100 SXM dense BF16 tensor 989.4 TFLOP/s: glennklockwood.com/garden/processors/h100 "
                           "(NVIDIA Hopper whitepaper)",
            "train_mfu": args.train_mfu, "infer_mfu": args.infer_mfu,
            "counted": "FlopCounterMode: matmul/conv/attention, 2 FLOPs per MAC; element-wise ops, loss and "
                       "optimiser not counted (loss: 0 matrix-product FLOPs); attention counted as its two "
                       "batched products",
            "cached_step": "student + 3 transformer projectors fwd+bwd; decoding targets on the device "
                           "(int8 scale, PCA (r,D) matmul) not counted: element-wise, or a D*r matmul per token "
                           "(<1% of the step)",
            "live_step": "cached step + the 3 teachers' forwards on the augmented image",
            "ratios_source": f"{ENCODINGS_JSON} ({RATIO_TEACHER}, docs/benchmarks.md 'Feature encodings on real "
                             "features'); blosc-zstd5 from docs/benchmarks.md 'Lossless codecs on real features'",
        },
        "teachers": teachers,
        "student_fwd_bwd": students,
        "steps": steps,
        "cached_samples_per_s_per_h100": {r: steps["transformer"][r]["cached_samples_per_s_per_h100"]
                                          for r in map(str, resolutions)},
        "live_samples_per_s_per_h100": {r: steps["transformer"][r]["live_samples_per_s_per_h100"]
                                        for r in map(str, resolutions)},
        "extraction_images_per_s_per_h100": {t: {r: v["extraction_images_per_s_per_h100"] for r, v in per.items()}
                                             for t, per in teachers.items()},
        "mfu_sensitivity": {
            str(mfu): {r: {"cached_samples_per_s_per_h100": samples_per_s(
                steps["transformer"][r]["cached_step_gflops"] * 1e9, args.peak_tflops, mfu),
                "live_samples_per_s_per_h100": samples_per_s(
                    steps["transformer"][r]["live_step_gflops"] * 1e9, args.peak_tflops, mfu)}
                for r in map(str, resolutions)} for mfu in (0.2, 0.3, 0.4, 0.5)},
        "dune_recipe": dune_recipe_table(steps, teachers, args.peak_tflops, args.train_mfu, args.infer_mfu, views),
        "storage": storage_table(teachers, steps, ratios, views),
        "cross_check": cross_check_table(args.peak_tflops),
    }


def print_summary(report: dict) -> None:
    """The key figures, as markdown tables."""
    print("| student res | teacher | input | grid | fwd GFLOP | H100 img/s |")
    print("|---|---|---|---|---|---|")
    for t, per in report["teachers"].items():
        for r, v in per.items():
            print(f"| {r} | {t} | {v['input'][0]} | {v['grid'][0]}x{v['grid'][1]} | {v['forward_gflops']:.1f} | "
                  f"{v['extraction_images_per_s_per_h100']:.0f} |")
    print("\n| head | res | cached GFLOP | live GFLOP | speedup (equal MFU) | cached/s | live/s |")
    print("|---|---|---|---|---|---|---|")
    for kind, per in report["steps"].items():
        for r, v in per.items():
            print(f"| {kind} | {r} | {v['cached_step_gflops']:.1f} | {v['live_step_gflops']:.1f} | "
                  f"{v['speedup_equal_mfu']:.2f} | {v['cached_samples_per_s_per_h100']:.0f} | "
                  f"{v['live_samples_per_s_per_h100']:.0f} |")
    print("\nDUNE recipe:", json.dumps(report["dune_recipe"]["totals"], indent=1))
    print("\n| published | model | mode | samples/s | GFLOP/sample | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|")
    for row in report["cross_check"]:
        mfu = f"{row['implied_mfu']:.2f}" if row["implied_mfu"] is not None else "-"
        print(f"| {row['gpu']} | {row['timm_model']}@{row['img_size']} | {row['mode']} | {row['samples_per_s']:.1f} | "
              f"{row['gflops_per_sample']:.1f} | {row['achieved_tflops']:.1f} | {mfu} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_TFLOPS,
                        help="GPU dense bf16 peak, TFLOP/s (default: H100 SXM)")
    parser.add_argument("--train-mfu", type=float, default=0.30, help="utilisation of student fwd+bwd")
    parser.add_argument("--infer-mfu", type=float, default=0.40, help="utilisation of teacher forwards")
    parser.add_argument("--views", type=int, nargs="+", default=[0, 1, 3, 6],
                        help="extra cached views K per image (K+1 teacher forwards, K+1 stored targets)")
    parser.add_argument("--encodings-json", default=ENCODINGS_JSON, help="bench_encodings JSON with measured ratios")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    report = build_report(args)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()

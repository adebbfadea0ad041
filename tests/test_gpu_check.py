"""benchmarks/gpu_check.py: every section's code path at tiny sizes on the CPU, its results format, and
the torch-only parts of dda_ray importing with Ray and MLflow unimportable (the GPU machine has neither)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GPU_CHECK = ROOT / "benchmarks" / "gpu_check.py"
# Run first in each child: `import ray` / `import mlflow` (and their submodules) raise ImportError, and
# importlib.util.find_spec reports them absent, as on a machine without them.
NO_RAY = "import sys\nsys.modules.update(dict.fromkeys(('ray', 'mlflow')))\n"
# Every figure the tiny run must print, by section: (metric, how many lines).
EXPECTED = {
    "peak": [("matmul_peak_bf16_tflops", 1)],
    "augment": [("augment_variations_per_s", 2)],  # batches 2 and 4
    "filter": [("filter_embeddings_per_s", 1)],
    "synthesis": [
        ("synthesis_img_per_s_dda", 2),  # initial-bank and epoch rounds
        ("synthesis_img_per_s_fast", 2),
        ("synthesis_bank_gpu_hours_dda", 1),
        ("synthesis_bank_gpu_hours_fast", 1),
    ],
    "kd": [("kd_img_per_s", 4)],  # fp32, bf16, + channels_last, + compile
}


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_without_ray(code: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # one thread: two thrash on 2 shared cores
    return subprocess.run([sys.executable, "-c", NO_RAY + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_torch_parts_import_without_ray_and_mlflow():
    proc = run_without_ray(
        "import importlib.util\n"
        "for name in ('ray', 'mlflow', 'ray.data', 'mlflow.tracking'):\n"
        "    try:\n"
        "        __import__(name)\n"
        "    except ImportError:\n"
        "        pass\n"
        "    else:\n"
        "        raise SystemExit(f'{name} imported: the block does not work')\n"
        "    assert importlib.util.find_spec(name.split('.')[0]) is None\n"
        "import dda_ray.synthesis.synthesizer, dda_ray.distill.kd, dda_ray.augment.backends, dda_ray.augment.filter, dda_ray.augment.augmenter\n"
        f"spec = importlib.util.spec_from_file_location('gpu_check', {str(GPU_CHECK)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        "mod.build_parser().parse_args(['--tiny'])\n"
        "assert sys.modules['ray'] is None and sys.modules['mlflow'] is None\n"
        "print('imported without ray and mlflow')\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "imported without ray and mlflow" in proc.stdout


def test_tiny_run_on_cpu_prints_every_sections_figures(tmp_path):
    out = tmp_path / "perf.jsonl"
    argv = [str(GPU_CHECK), "--device", "cpu", "--tiny", "--no-record", "--out", str(out), "--work-dir", str(tmp_path / "work")]
    proc = run_without_ray(f"import runpy\nsys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')\n")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures: dict[tuple[str, str], list[float]] = {}
    for m in re.finditer(r"^figure (\w+) (\w+) = (\S+) ", proc.stdout, re.MULTILINE):
        figures.setdefault((m[1], m[2]), []).append(float(m[3]))
    for section, metrics in EXPECTED.items():
        for metric, count in metrics:
            values = figures.get((section, metric), [])
            assert len(values) == count, f"{section}/{metric}: {values}\n{proc.stdout}"
            assert all(math.isfinite(v) and v > 0 for v in values), (section, metric, values)
    assert "goal UNet >= 40% of the bf16 peak" in proc.stdout and "goal KD step >= 2x fp32 img/s" in proc.stdout
    assert "skipped" not in proc.stdout and "error in" not in proc.stdout
    assert not out.exists(), "--no-record wrote the results file"
    assert (tmp_path / "work" / "sd" / "sd_image_variations" / "model_index.json").exists()  # the pipeline the Augmenter loaded


def test_figures_are_recorded_in_perf_jsonl_format(tmp_path):
    gpu_check = load(GPU_CHECK, "gpu_check")
    out = tmp_path / "perf.jsonl"
    results = gpu_check.Results(out, {"device": "NVIDIA H100 80GB HBM3", "tiny": False})
    results.emit("kd", "kd_img_per_s", 1234.5, "img/s", arm="bf16", ratio_to_fp32=2.5)
    (line,) = [json.loads(s) for s in out.read_text().splitlines()]
    assert {"metric", "value", "unit", "detail", "commit", "date", "load"} <= set(line)
    assert (line["metric"], line["value"], line["unit"]) == ("gpu_check_kd_img_per_s", 1234.5, "img/s")
    assert line["detail"]["device"] == "NVIDIA H100 80GB HBM3" and line["detail"]["arm"] == "bf16" and "cpu" in line["detail"]


def test_fast_settings_are_the_accuracy_benchmarks():
    gpu_check = load(GPU_CHECK, "gpu_check")
    accuracy = load(ROOT / "benchmarks" / "accuracy.py", "bench_accuracy")
    assert gpu_check.FAST == accuracy.FAST


def test_sizes_and_arms_cover_the_issue():
    gpu_check = load(GPU_CHECK, "gpu_check")
    full = gpu_check.FULL
    assert full.aug_steps == 25 and min(full.aug_batches) == 8 and max(full.aug_batches) == 64
    assert full.kd_batch == 256 and full.synth_images == (200, 400)
    assert list(gpu_check.KD_ARMS) == ["fp32", "bf16", "bf16+channels_last", "bf16+channels_last+compile"]
    with pytest.raises(SystemExit):
        gpu_check.build_parser().parse_args(["--sections", "nonsense"])


def test_a_failing_arm_is_reported_and_the_next_runs(capsys):
    import torch

    gpu_check = load(GPU_CHECK, "gpu_check")
    results = gpu_check.Results(None, {})
    ran = []
    for arm in ("first", "second"):
        with gpu_check.guarded(results, f"kd {arm}", torch.device("cpu")):
            ran.append(arm)
            if arm == "first":
                raise RuntimeError("no C compiler")
    assert ran == ["first", "second"] and results.failures == ["kd first: RuntimeError: no C compiler"]
    assert "error in kd first: RuntimeError: no C compiler" in capsys.readouterr().out

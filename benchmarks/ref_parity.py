"""Run the reference implementations of our synthesis methods at the CPU bench budget (issue #26).

    python benchmarks/ref_parity.py prepare [--scratch /work/scratch]
    python benchmarks/ref_parity.py run --ref dda fast cmi --seeds 0 1 2 [--rerun] [--results ...]
    python benchmarks/ref_parity.py status
    python benchmarks/ref_parity.py patches          # every patch, in words (docs/PARITY.md lists the same)

Each of our synthesis methods has a public reference implementation; this script runs each one at
the budget of ``configs/cifar10_cpu_bench.yaml`` (read from the preset: epochs, KD steps, batch,
learning rate, temperature, feature weight, bank and per-epoch rounds) with the settings of the
reference's own scripts, on one CPU core, and appends one line per (arm, seed) to
``benchmarks/results/accuracy.jsonl``, beside the arms of ``benchmarks/accuracy.py``:

  ref_dda   SLGSP/DDA                ``datafree_kd.py --method dda`` (an initial bank without
            ``--run_kd``, then the KD run on it, as its scripts/dda/*.sh)
  ref_fast  zju-vipa/Fast-Datafree   ``datafree_kd.py --method fast_meta`` (its WRN "Fast-2" line of
            scripts/fast_cifar.sh; warm-up rounds, then KD rounds with the same generator image-steps
            as our bench's cmi settings, in rounds of 2 steps)
  ref_cmi   zju-vipa/CMI             ``datafree_kd.py --method cmi`` (an initial bank without KD,
            then the KD run with ``--cmi_init``, as scripts/cmi/*.sh)

No reference code is in this project, and the project's tests do not need any of it. The reference
repositories are public; each is used at one commit (``REFS`` below), as a snapshot fetched into a
scratch folder outside the project (``--scratch``, default /work/scratch): ``<scratch>/<owner>+<name>``,
e.g. ``git clone https://github.com/zju-vipa/CMI /work/scratch/zju-vipa+CMI`` and a checkout of the
commit. ``prepare`` then

  * makes a virtualenv for them (``<scratch>/venv``: a torch / torchvision pair from PyPI, kornia,
    tensorboard; never the project's), unless one is there;
  * writes CIFAR-10 in torchvision's python-pickle format (``<scratch>/data``) from the project's
    JPEG copy (the preset's ``data.path``), decoded by the project's own loader;
  * converts our teacher (``teacher.checkpoint`` of the preset) into their WRN layout and saves it
    where their ``datafree_kd.py`` loads it (``checkpoints/pretrained/cifar10_wrn16_2.pth``);
  * applies the patches below (``PATCHES``: small text substitutions, each with its reason) to the
    tracked files of each copy, starting from the commit's text, so ``git diff`` in the copy is the
    record of what changed;
  * checks that the converted teacher, in the reference's own model, data and evaluator code,
    scores the teacher's recorded accuracy on the 10,000 test images (within 0.1).

``run`` refuses a copy whose commit or patched files differ from this script's, runs the
reference's entry point (cwd = the copy, ``OMP_NUM_THREADS=1``, ``--workers 0``), keeps its
output under ``<scratch>/logs`` and takes the per-epoch ``[Eval] ... Acc@1=`` lines of its KD
epochs. An (arm, seed) already in the results file is skipped unless ``--rerun``; the file is only
appended to. Several refs and seeds run one after the other, seeds outermost.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import append_result, git_commit, read_results  # noqa: E402  (beside this script: one results format)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RESULTS = ROOT / "benchmarks" / "results" / "accuracy.jsonl"
PRESET = "configs/cifar10_cpu_bench.yaml"
TEACHER_TOLERANCE = 0.1  # top-1 points between the teacher's recorded accuracy and the reference code's
# The reference virtualenv: torch from PyPI with its matching torchvision (the CUDA build runs on the
# CPU); torchvision's PyPI wheels do not load beside the project's CPU-only torch build.
REF_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1", "kornia==0.9.0", "tensorboard==2.21.0", "tqdm", "termcolor", "einops", "pillow", "numpy", "scipy", "scikit-learn", "matplotlib"]
VERSION_NAMES = ("torch", "torchvision", "kornia", "numpy", "pillow")


@dataclass(frozen=True)
class Ref:
    arm: str
    repo: str  # owner/name on GitHub
    commit: str
    method: str  # datafree_kd.py --method

    def dir(self, scratch: Path) -> Path:
        return scratch / self.repo.replace("/", "+")


REFS = {
    "dda": Ref("ref_dda", "SLGSP/DDA", "ffe6ed27e91563f99d1dc475cce854ddb0bbf94c", "dda"),
    "fast": Ref("ref_fast", "zju-vipa/Fast-Datafree", "0dcecbc178b87048bedf730acb577045b3c0b57a", "fast_meta"),
    "cmi": Ref("ref_cmi", "zju-vipa/CMI", "9e79fa9e2328205f26dbdb226878f3a28f3bf4cc", "cmi"),
}

# Fast-Datafree's WRN "Fast-2" line (scripts/fast_cifar.sh) runs rounds of this many generator steps.
FAST_STEPS = 2


# ------------------------------------------------------------------ patches
@dataclass(frozen=True)
class Patch:
    ref: str  # key of REFS
    file: str  # path in the copy
    old: str
    new: str
    why: str
    count: int = 1  # occurrences of ``old`` the commit's file has (all are replaced)


CPU = "torch.device('cpu')"
NORM_OLD = "'cifar10':  dict( mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010) ),"
CIFAR_IMPORT = "from torchvision import datasets, transforms as T\n"
LOADER_OLD = "num_workers=4, pin_memory=True, sampler=train_sampler)"
LOADER_NEW = "num_workers=0, pin_memory=True, sampler=train_sampler)"
EVAL_OLD = "        student.eval()\n        eval_results = evaluator(student, device=args.gpu)\n        (acc1, acc5), val_loss"  # the loop's, not --evaluate_only's
EVAL_SKIP = ("        if args.eval_kd_only and {cond}:  # parity: no KD in this epoch, nothing to evaluate\n"
             "            print('[Synthesis only] Epoch=%d' % epoch, flush=True)\n            continue\n")


def patches(mean: list[float], std: list[float]) -> list[Patch]:
    """Every change made to the copies; ``mean``/``std`` are the teacher's normalisation."""
    norm_new = f"'cifar10':  dict( mean=({', '.join(map(repr, mean))}), std=({', '.join(map(repr, std))}) ),"
    out: list[Patch] = []
    for key, synth in (("dda", "datafree/synthesis/dda.py"), ("fast", "datafree/synthesis/fast_meta.py"), ("cmi", "datafree/synthesis/contrastive.py")):
        out += [
            Patch(key, "registry.py", NORM_OLD, norm_new,
                  "the CIFAR-10 normaliser is our teacher's own mean/std (its meta.json), not the registry's values it was never trained with"),
            Patch(key, "registry.py", CIFAR_IMPORT, CIFAR_IMPORT + "datasets.CIFAR10._check_integrity = lambda self: True  # parity: local copy, not the official md5s\n"
                  "datasets.CIFAR10.meta = {**datasets.CIFAR10.meta, 'md5': None}  # parity: only check that batches.meta exists\n",
                  "the CIFAR-10 pickles are converted from the project's JPEG copy, so torchvision's md5 checks fail (and it would try a download, "
                  "no network): skip the batches' check and the metadata file's md5"),
            Patch(key, synth, LOADER_OLD, LOADER_NEW,
                  "the synthetic-image DataLoader reads the pool in the main process (4 worker processes would use more than the one core a run gets)"),
        ]
    for key in ("fast", "cmi"):
        for file in ("datafree/models/classifiers/mobilenetv2.py", "datafree/models/classifiers/resnet_in.py",
                     "datafree/models/deeplab/backbone/mobilenetv2.py", "datafree/models/deeplab/backbone/resnet.py"):
            out.append(Patch(key, file, "from torchvision.models.utils import load_state_dict_from_url", "from torch.hub import load_state_dict_from_url",
                             "torchvision.models.utils no longer exists (the package imports it for models not used here); "
                             "the same function lives in torch.hub"))
    out += [
        # SLGSP/DDA
        Patch("dda", "datafree_kd.py", "    args.gpu = 6\n", f"    args.gpu = {CPU}\n",
              "the device is hard-coded to GPU 6; run on the CPU"),
        Patch("dda", "datafree_kd.py", ".cuda(args.gpu, non_blocking=True)", ".to(args.gpu, non_blocking=True)",
              "KD batches are moved with .cuda(); .to(device) works on the CPU", count=2),
        Patch("dda", "datafree_kd.py",
              "parser.add_argument('--fea', default=30, type=float, help='scaling factor for feature loss')\n",
              "parser.add_argument('--fea', default=30, type=float, help='scaling factor for feature loss')\n"
              "parser.add_argument('--head_every', default=1, type=int, help='parity: train the rotation head every N-th KD step')\n"
              "parser.add_argument('--eval_kd_only', action='store_true', help='parity: evaluate only the classifier after KD epochs')\n",
              "new arguments --head_every (default 1 = the reference's every step) and --eval_kd_only (default off) for the patches below"),
        Patch("dda", "datafree_kd.py", "        student.eval()\n        if args.method == 'dda':\n",
              EVAL_SKIP.format(cond="not args.run_kd") + "        student.eval()\n"
              "        if args.method == 'dda' and not args.eval_kd_only:  # parity: no auxiliary-head evaluation\n",
              "evaluation cost only (no training computation changes; each skipped pass over the test loader is one base-seed draw fewer "
              "from torch's global RNG, so the run is another draw of the same procedure): with --eval_kd_only an epoch without KD "
              "(the bank invocation) evaluates nothing, and the auxiliary rotation head's accuracy on the 4 rotations of the test set "
              "(40,000 student forwards per epoch, logged to tensorboard only) is skipped; the student's top-1 is evaluated after every KD epoch"),
        Patch("dda", "datafree_kd.py",
              "            loss_s.backward()\n            optimizer.step()\n            if args.method == 'dda':\n                synthesizer.train_head()\n",
              "            loss_s.backward()\n            optimizer.step()\n"
              "            args.kd_step_count = getattr(args, 'kd_step_count', 0) + 1  # parity: KD steps over the whole run\n"
              "            if args.method == 'dda' and args.kd_step_count % args.head_every == 0:\n"
              "                synthesizer.train_head()\n",
              "budget: the rotation head's training step runs on every --head_every-th KD step counted over the whole run "
              "(the bench preset's synthesis.rotation_every: 8), not on every step"),
        # zju-vipa/Fast-Datafree
        Patch("fast", "datafree_kd.py", "    args.gpu = gpu\n", f"    args.gpu = {CPU}\n", "run on the CPU (--gpu is an int GPU id)"),
        Patch("fast", "datafree_kd.py", ".cuda(args.gpu, non_blocking=True)", ".to(args.gpu, non_blocking=True)",
              "KD batches are moved with .cuda(); .to(device) works on the CPU"),
        Patch("fast", "datafree/evaluators.py", "inputs, targets = inputs.cuda(), targets.cuda()", "inputs, targets = inputs.to(device), targets.to(device)",
              "the evaluators call .cuda(); use the device they are given", count=2),
        Patch("fast", "datafree/models/generator.py", "return clone.cuda()", "return clone",
              "Generator.clone() (the fast generator of each round) moves the copy to the GPU; keep it on the CPU", count=2),
        Patch("fast", "datafree/synthesis/fast_meta.py", "Variable(torch.zeros(p.size())).cuda()", "torch.zeros_like(p)",
              "the meta-gradient buffers are made with .cuda(); make them beside the parameter", count=2),
        Patch("fast", "datafree_kd.py", "CosineAnnealingLR(optimizer, 200, eta_min=2e-4)", "CosineAnnealingLR(optimizer, args.epochs - args.warmup, eta_min=0)",
              "budget: the cosine schedule spans the KD epochs (T_max = epochs - warmup = 6, eta_min 0) instead of T_max 200, eta_min 2e-4; "
              "it is still stepped after each KD epoch only"),
        Patch("fast", "datafree_kd.py",
              "parser.add_argument('--cmi_init', default=None, type=str, help='path to pre-inverted data')\n",
              "parser.add_argument('--cmi_init', default=None, type=str, help='path to pre-inverted data')\n"
              "parser.add_argument('--kd_synthesis_batch_size', default=None, type=int, help='parity: synthesis batch after the warm-up')\n"
              "parser.add_argument('--eval_kd_only', action='store_true', help='parity: evaluate only after KD epochs')\n",
              "new arguments --kd_synthesis_batch_size and --eval_kd_only for the patches below"),
        Patch("fast", "datafree_kd.py", EVAL_OLD, EVAL_SKIP.format(cond="epoch < args.warmup") + EVAL_OLD,
              "evaluation cost only: with --eval_kd_only the warm-up epochs (no KD: the student is untrained) are not evaluated; "
              "they print a '[Synthesis only] Epoch=N' line instead (their scheduler step and checkpoint were no-ops already)"),
        Patch("fast", "datafree_kd.py", "        args.current_epoch=epoch\n",
              "        args.current_epoch=epoch\n"
              "        if epoch >= args.warmup and args.kd_synthesis_batch_size:  # parity: KD rounds synthesise fewer images\n"
              "            synthesizer.synthesis_batch_size = args.kd_synthesis_batch_size\n",
              "budget: the rounds of the KD epochs synthesise --kd_synthesis_batch_size images (80), the warm-up rounds "
              "--synthesis_batch_size (128)"),
        # zju-vipa/CMI
        Patch("cmi", "datafree_kd.py", "    args.gpu = gpu\n", f"    args.gpu = {CPU}\n", "run on the CPU (--gpu is an int GPU id)"),
        Patch("cmi", "datafree_kd.py", ".cuda(args.gpu, non_blocking=True)", ".to(args.gpu, non_blocking=True)",
              "KD batches are moved with .cuda(); .to(device) works on the CPU"),
        Patch("cmi", "datafree_kd.py",
              "parser.add_argument('--cmi_init', default=None, type=str, help='path to pre-inverted data')\n",
              "parser.add_argument('--cmi_init', default=None, type=str, help='path to pre-inverted data')\n"
              "parser.add_argument('--no_kd', action='store_true', help='parity: synthesise only (an initial bank)')\n"
              "parser.add_argument('--eval_kd_only', action='store_true', help='parity: evaluate only after KD epochs')\n",
              "a new argument --no_kd: CMI's datafree_kd.py always distils after each round, so it has no invocation that only "
              "synthesises an initial bank (its README downloads one); --no_kd skips train() and nothing else"),
        Patch("cmi", "datafree_kd.py",
              "            train( synthesizer, [student, teacher], criterion, optimizer, args) # # kd_steps\n",
              "            if not args.no_kd:\n"
              "                train( synthesizer, [student, teacher], criterion, optimizer, args) # # kd_steps\n",
              "with --no_kd, the round's KD steps are skipped"),
        Patch("cmi", "datafree_kd.py", EVAL_OLD, EVAL_SKIP.format(cond="args.no_kd") + EVAL_OLD,
              "evaluation cost only: with --eval_kd_only and --no_kd (the bank invocation) the untrained student is not evaluated; "
              "each epoch prints a '[Synthesis only] Epoch=N' line instead"),
    ]
    return out


def patched_text(original: str, ps: list[Patch], where: str) -> str:
    text = original
    for p in ps:
        n = text.count(p.old)
        if n != p.count:
            raise SystemExit(f"error: {where}: expected {p.count} occurrence(s) of {p.old!r}, found {n}: not the commit this script patches")
        text = text.replace(p.old, p.new)
    return text


def by_file(ps: list[Patch], key: str) -> dict[str, list[Patch]]:
    out: dict[str, list[Patch]] = {}
    for p in ps:
        if p.ref == key:
            out.setdefault(p.file, []).append(p)
    return out


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout


def check_copy(ref: Ref, scratch: Path) -> Path:
    d = ref.dir(scratch)
    if not (d / "datafree_kd.py").exists():
        raise SystemExit(f"error: no copy of {ref.repo} at {d}: git clone https://github.com/{ref.repo} {d} && git -C {d} checkout {ref.commit}")
    head = git(d, "rev-parse", "HEAD").strip()
    if head != ref.commit:
        raise SystemExit(f"error: {d} is at {head}, this script patches and runs {ref.commit}")
    return d


def apply_patches(key: str, scratch: Path, ps: list[Patch]) -> None:
    """The commit's text of each patched file, patched; rewritten only where it differs."""
    d = check_copy(REFS[key], scratch)
    for file, fps in by_file(ps, key).items():
        text = patched_text(git(d, "show", f"HEAD:{file}"), fps, f"{d}/{file}")
        if (d / file).read_text() != text:
            (d / file).write_text(text)
    dirty = [line[3:] for line in git(d, "status", "--porcelain", "--untracked-files=no").splitlines()]
    extra = sorted(set(dirty) - set(by_file(ps, key)))
    if extra:
        raise SystemExit(f"error: {d} has changes this script does not make: {extra}; git -C {d} checkout -- {' '.join(extra)}")


def verify_patches(key: str, scratch: Path, ps: list[Patch]) -> None:
    d = check_copy(REFS[key], scratch)
    for file, fps in by_file(ps, key).items():
        if (d / file).read_text() != patched_text(git(d, "show", f"HEAD:{file}"), fps, f"{d}/{file}"):
            raise SystemExit(f"error: {d}/{file} is not the patched text this script makes; run: python benchmarks/ref_parity.py prepare")
    dirty = {line[3:] for line in git(d, "status", "--porcelain", "--untracked-files=no").splitlines()}
    if dirty - set(by_file(ps, key)):
        raise SystemExit(f"error: {d} has other changes: {sorted(dirty - set(by_file(ps, key)))}")


# ------------------------------------------------------------------ budget
def bench_budget(preset: str) -> dict:
    """The budget of the bench preset, which every reference run is mapped onto."""
    from dda_ray.config import load_config
    from dda_ray.models.checkpoint import resolved_teacher_arch

    cfg = load_config(str(ROOT / preset) if not Path(preset).is_absolute() else preset, [])
    d, s = cfg.distill, cfg.synthesis
    b = {
        "teacher": resolved_teacher_arch(cfg), "student": cfg.student.arch, "epochs": d.epochs, "kd_steps": d.steps_per_epoch, "batch_size": d.batch_size,
        "lr": d.lr, "momentum": d.momentum, "weight_decay": d.weight_decay, "T": d.temperature, "fea": d.fea,
        "init_rounds": s.init_rounds, "init_batch_size": s.init_batch_size, "init_g_steps": s.init_g_steps,
        "batch_size_g": s.batch_size, "g_steps": s.g_steps, "rounds_per_epoch": s.rounds_per_epoch, "rotation_every": s.rotation_every,
    }
    # the references fix these; a preset that changed them could not be matched by arguments alone
    fixed = {"momentum": 0.9, "weight_decay": 1e-4, "rounds_per_epoch": 1, "teacher": "wrn16_2", "student": "wrn16_1"}
    bad = {k: b[k] for k, v in fixed.items() if b[k] != v}
    if bad or not d.steps_per_epoch:
        raise SystemExit(f"error: {preset} has {bad or {'steps_per_epoch': d.steps_per_epoch}}; the reference runs need {fixed} and a steps_per_epoch")
    b["fast_warmup"] = max(1, b["init_rounds"] * b["init_g_steps"] // FAST_STEPS)  # same generator image-steps in rounds of 2 steps
    b["fast_batch_size_g"] = max(1, b["batch_size_g"] * b["g_steps"] // FAST_STEPS)
    return b


def num(x: float) -> str:
    return f"{x:g}"


def invocations(key: str, seed: int, b: dict, data_root: Path, run_dir: Path) -> list[tuple[str, list[str]]]:
    """(name, datafree_kd.py arguments) of each invocation of one reference run, in order."""
    tag = f"parity-{key}-s{seed}"
    common = ["--dataset", "cifar10", "--data_root", str(data_root), "--teacher", b["teacher"], "--student", b["student"],
              "--batch_size", str(b["batch_size"]), "--lr", num(b["lr"]), "--T", num(b["T"]), "--seed", str(seed), "--workers", "0", "--eval_kd_only"]
    kd_budget = ["--epochs", str(b["epochs"]), "--kd_steps", str(b["kd_steps"]), "--ep_steps", str(b["kd_steps"])]
    bank = run_dir / "bank"
    if key == "dda":  # scripts/dda/dda_cifar10_initBank_wrn402.sh, then dda_cifar10_wrn402_wrn161.sh
        method = ["--method", "dda", "--lr_g", "1e-3", "--bn", "1", "--oh", "1", "--adv", "0"]
        return [
            ("bank", [*method, *common, "--epochs", str(b["init_rounds"]), "--g_steps", str(b["init_g_steps"]),
                      "--synthesis_batch_size", str(b["init_batch_size"]), "--dda", "0", "--save_dir", str(bank), "--log_tag", f"{tag}-bank"]),
            ("kd", [*method, *common, *kd_budget, "--g_steps", str(b["g_steps"]), "--synthesis_batch_size", str(b["batch_size_g"]),
                    "--dda", "10", "--fea", num(b["fea"]), "--head_every", str(b["rotation_every"]), "--init_bank", str(bank), "--run_kd",
                    "--save_dir", str(run_dir / "kd"), "--log_tag", f"{tag}-kd"]),
        ]
    if key == "fast":  # the WRN "Fast-2" line of scripts/fast_cifar.sh
        w = b["fast_warmup"]
        return [
            ("kd", ["--method", "fast_meta", *common, "--kd_steps", str(b["kd_steps"]), "--ep_steps", str(b["kd_steps"]),
                    "--epochs", str(w + b["epochs"]), "--warmup", str(w), "--g_steps", str(FAST_STEPS),
                    "--synthesis_batch_size", str(b["init_batch_size"]), "--kd_synthesis_batch_size", str(b["fast_batch_size_g"]),
                    "--adv", "1.1", "--bn", "10", "--oh", "0.4", "--act", "0", "--balance", "0", "--bn_mmt", "0.9",
                    "--lr_z", "0.015", "--lr_g", "5e-3", "--is_maml", "1", "--reset_l0", "1", "--reset_bn", "0",
                    "--save_dir", str(run_dir / "kd"), "--log_tag", tag]),
        ]
    # cmi: scripts/cmi/cmi_cifar10.sh's weights; a bank without KD (--no_kd), then KD on it (--cmi_init)
    method = ["--method", "cmi", "--lr_g", "1e-3", "--bn", "1", "--oh", "1", "--cr", "0.8", "--cr_T", "0.2", "--act", "0", "--balance", "0"]
    return [
        ("bank", [*method, *common, "--epochs", str(b["init_rounds"]), "--g_steps", str(b["init_g_steps"]),
                  "--synthesis_batch_size", str(b["init_batch_size"]), "--adv", "0", "--no_kd", "--save_dir", str(bank), "--log_tag", f"{tag}-bank"]),
        ("kd", [*method, *common, *kd_budget, "--g_steps", str(b["g_steps"]), "--synthesis_batch_size", str(b["batch_size_g"]),
                "--adv", "0.5", "--cmi_init", str(bank), "--save_dir", str(run_dir / "kd"), "--log_tag", f"{tag}-kd"]),
    ]


# ------------------------------------------------------------------ helpers
class Scratch:
    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.venv = self.root / "venv"
        self.python = self.venv / "bin" / "python"
        self.data = self.root / "data"
        self.logs = self.root / "logs"
        self.runs = self.root / "runs"
        self.state = self.root / "parity-prepare.json"


def ref_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="")
    return env


def teacher_meta(preset: str) -> tuple[Path, dict]:
    from dda_ray.config import load_config

    cfg = load_config(str(ROOT / preset), []).with_absolute_paths()
    ckpt = Path(cfg.teacher.checkpoint)
    return ckpt, json.loads((ckpt / "meta.json").read_text())


def all_patches(preset: str) -> list[Patch]:
    _, meta = teacher_meta(preset)
    return patches(meta["mean"], meta["std"])


def ref_versions(sc: Scratch) -> dict:
    code = (
        "import json, torch\nfrom importlib.metadata import version, PackageNotFoundError\nout = {}\n"
        f"for n in {VERSION_NAMES!r}:\n"
        "    try: out[n] = version(n)\n"
        "    except PackageNotFoundError: out[n] = None\n"
        "print(json.dumps({'versions': out, 'capability': torch.backends.cpu.get_cpu_capability(), 'threads': torch.get_num_threads()}))\n"
    )
    res = subprocess.run([str(sc.python), "-c", code], capture_output=True, text=True, check=True, env=ref_env())
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ prepare
def make_venv(sc: Scratch) -> None:
    if sc.python.exists():
        return
    print(f"creating {sc.venv} ({' '.join(REF_PACKAGES)}); a few GB", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(sc.venv)], check=True)
    subprocess.run([str(sc.python), "-m", "pip", "install", *REF_PACKAGES], check=True)


def write_cifar_pickles(sc: Scratch, data_path: Path, cache_dir: str) -> Path:
    """torchvision's CIFAR-10 python format (``cifar-10-batches-py``) from the project's decoded copy;
    ``CIFAR10`` and ``torchdata`` (the references' data_root subfolders) both point at it."""
    import numpy as np

    from dda_ray.data.datasets import load_dataset

    base = sc.data / "torchdata" / "cifar-10-batches-py"
    stamp = {"source": str(data_path), "size": data_path.stat().st_size, "mtime": data_path.stat().st_mtime}
    marker = base / "SOURCE.json"
    if not (marker.exists() and json.loads(marker.read_text()) == stamp):
        ds = load_dataset("imagefolder", data_path, cache_dir=cache_dir)
        if len(ds.classes) != 10 or len(ds.test) != 10000 or len(ds.train) != 50000:
            raise SystemExit(f"error: {data_path}: expected CIFAR-10 (10 classes, 50,000 + 10,000 images), got {len(ds.classes)} classes")
        base.mkdir(parents=True, exist_ok=True)

        def dump(name: str, images: np.ndarray, labels: np.ndarray) -> None:
            rows = np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(len(images), -1)  # NHWC -> the format's CHW rows
            entry = {"batch_label": name, "labels": [int(y) for y in labels], "data": rows, "filenames": [f"{name}-{i}.png" for i in range(len(rows))]}
            with open(base / name, "wb") as f:
                pickle.dump(entry, f, protocol=4)

        for k in range(5):
            sl = slice(k * 10000, (k + 1) * 10000)
            dump(f"data_batch_{k + 1}", ds.train.images[sl], ds.train.labels[sl])  # train order: by class (only its transform is used)
        dump("test_batch", ds.test.images, ds.test.labels)
        with open(base / "batches.meta", "wb") as f:
            pickle.dump({"label_names": list(ds.classes), "num_cases_per_batch": 10000, "num_vis": 3072}, f, protocol=4)
        marker.write_text(json.dumps(stamp))
        print(f"wrote {base} from {data_path}", flush=True)
    link = sc.data / "CIFAR10"  # SLGSP/DDA's registry reads <data_root>/CIFAR10, zju-vipa's <data_root>/torchdata
    if not link.exists():
        link.symlink_to("torchdata")
    return sc.data


def to_reference_wrn(state: dict) -> dict:
    """Our WRN keys (``blocks.{k}``, ``shortcut``, final ``bn``) -> their layout (``block{b}.layer.{i}``,
    ``convShortcut``, final ``bn1``): the inverse of dda_ray.models.community's map."""
    blocks = {int(k.split(".")[1]) for k in state if k.startswith("blocks.")}
    if len(blocks) % 3:
        raise SystemExit(f"error: {len(blocks)} residual blocks is not a WRN of three groups")
    per = len(blocks) // 3
    out = {}
    for k, v in state.items():
        if k.startswith("blocks."):
            _, i, rest = k.split(".", 2)
            out[f"block{int(i) // per + 1}.layer.{int(i) % per}.{rest.replace('shortcut.', 'convShortcut.')}"] = v
        elif k.startswith("bn."):
            out[f"bn1.{k.removeprefix('bn.')}"] = v
        else:
            out[k] = v  # conv1.*, fc.*
    return out


def convert_teacher(preset: str, dirs: list[Path]) -> dict:
    import torch
    from safetensors.torch import load_file

    ckpt, meta = teacher_meta(preset)
    state = to_reference_wrn(load_file(str(ckpt / "model.safetensors")))
    for d in dirs:
        out = d / "checkpoints" / "pretrained" / f"cifar10_{meta['arch']}.pth"
        out.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"state_dict": state}, out)
    return meta


TEACHER_CHECK = """
import json, sys, torch
import registry, datafree
n, _, val = registry.get_dataset(name='cifar10', data_root=sys.argv[1])
model = registry.get_model(sys.argv[2], num_classes=n)
model.load_state_dict(torch.load('checkpoints/pretrained/cifar10_%s.pth' % sys.argv[2], map_location='cpu')['state_dict'])
model.eval()
loader = torch.utils.data.DataLoader(val, batch_size=256, shuffle=False, num_workers=0)
res = datafree.evaluators.classification_evaluator(loader)(model, device=torch.device('cpu'))
print(json.dumps({'top1': float(res['Acc'][0]), 'n': len(val), 'threads': torch.get_num_threads()}))
"""


def prepare(args) -> None:
    from dda_ray.config import load_config

    sc = Scratch(args.scratch)
    make_venv(sc)
    cfg = load_config(str(ROOT / args.preset), []).with_absolute_paths()
    write_cifar_pickles(sc, Path(cfg.data.path), cfg.data.cache_dir)
    ps = all_patches(args.preset)
    dirs = {k: check_copy(r, sc.root) for k, r in REFS.items()}
    meta = convert_teacher(args.preset, list(dirs.values()))
    checks = {}
    for key, d in dirs.items():
        apply_patches(key, sc.root, ps)
        res = subprocess.run([str(sc.python), "-c", TEACHER_CHECK, str(sc.data), meta["arch"]], cwd=d, capture_output=True, text=True, env=ref_env())
        if res.returncode:
            raise SystemExit(f"error: teacher check in {d} failed:\n{res.stderr[-3000:]}")
        top1 = json.loads(res.stdout.strip().splitlines()[-1])["top1"]
        checks[key] = top1
        ok = abs(top1 - meta["accuracy"]) <= TEACHER_TOLERANCE
        print(f"{REFS[key].repo} @ {REFS[key].commit[:10]}: patched ({len(by_file(ps, key))} files); converted teacher top-1 {top1:.2f} "
              f"(recorded {meta['accuracy']}){'' if ok else '  <-- MISMATCH'}", flush=True)
        if not ok:
            raise SystemExit(f"error: the converted teacher scores {top1:.2f} in {d}, not {meta['accuracy']} (+-{TEACHER_TOLERANCE})")
    sc.state.write_text(json.dumps({"teacher_top1": meta["accuracy"], "teacher_top1_ref": checks, "data_root": str(sc.data),
                                    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}, indent=1))
    print(f"prepared: {sc.state}")


# ------------------------------------------------------------------ run
EVAL = re.compile(r"\[Eval\] Epoch=(\d+) Acc@1=([0-9.]+)")
SYNTH_ONLY = re.compile(r"\[Synthesis only\] Epoch=(\d+)")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def run_logged(cmd: list[str], cwd: Path, log: Path) -> tuple[int, list[tuple[int, float | None, float]], float]:
    """Run ``cmd``, copying its output to ``log``; returns (exit code, [(epoch, top-1 or None for an epoch
    without KD, seconds since start)], seconds)."""
    evals = []
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"# cwd {cwd}\n# {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ref_env())
        assert proc.stdout is not None
        for line in proc.stdout:
            f.write(line)
            f.flush()
            if m := EVAL.search(ANSI.sub("", line)):
                evals.append((int(m.group(1)), float(m.group(2)), time.perf_counter() - t0))
            elif m := SYNTH_ONLY.search(line):
                evals.append((int(m.group(1)), None, time.perf_counter() - t0))
        rc = proc.wait()
    return rc, evals, time.perf_counter() - t0


def run_one(key: str, seed: int, args, sc: Scratch, budget: dict, state: dict) -> dict | None:
    from dda_ray.runtime import cpu_description

    ref = REFS[key]
    d = check_copy(ref, sc.root)
    verify_patches(key, sc.root, all_patches(args.preset))
    run_dir = sc.runs / f"{ref.arm}-s{seed}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # the image pools are read back from disk: never mix an earlier run's files in
    run_dir.mkdir(parents=True)
    sc.logs.mkdir(parents=True, exist_ok=True)
    env_info = ref_versions(sc)
    commit, host_cpu = git_commit(), cpu_description()
    invs = invocations(key, seed, budget, Path(state["data_root"]), run_dir)
    times, logs, kd_evals = {}, [], []
    load_start = os.getloadavg()
    started = time.strftime("%H:%M:%S")
    print(json.dumps({"start": ref.arm, "seed": seed, "at": started, "logs": [str(sc.logs / f"{ref.arm}-s{seed}-{n}.log") for n, _ in invs]}), flush=True)
    for name, argv in invs:
        log = sc.logs / f"{ref.arm}-s{seed}-{name}.log"
        logs.append(str(log))
        rc, evals, secs = run_logged([str(sc.python), "datafree_kd.py", *argv], d, log)
        times[name] = secs
        if rc:
            print(f"error: {ref.arm} seed {seed} ({name}) exited {rc}; see {log}", flush=True)
            return None
        if name == "kd":
            kd_evals = evals
    load_end = os.getloadavg()
    bank_s = times.get("bank")
    if key == "fast":  # one invocation: its warm-up rounds are the bank
        w = budget["fast_warmup"]
        bank_s = next((t for e, acc, t in kd_evals if e == w - 1 and acc is None), None)  # its '[Synthesis only]' line
        if bank_s is None:
            print(f"error: {ref.arm} seed {seed}: no end of the warm-up (epoch {w - 1}) in {logs[-1]}", flush=True)
            return None
    kd_evals = [e for e in kd_evals if e[1] is not None]
    epochs = [acc for _, acc, _ in kd_evals]
    if len(epochs) != budget["epochs"] or (key == "fast" and kd_evals[0][0] != budget["fast_warmup"]):
        print(f"error: {ref.arm} seed {seed}: {len(epochs)} KD epoch evaluations in {logs[-1]}, expected {budget['epochs']}", flush=True)
        return None
    total = sum(times.values())
    return {
        "arm": ref.arm,
        "seed": seed,
        "preset": args.preset,
        "overrides": [],
        "top1": epochs[-1],
        "epochs": epochs,
        "wall_s": total - bank_s,  # as benchmarks/accuracy.py: the run without its initial bank (bank_s)
        "bank_s": bank_s,  # dda, cmi: the bank invocation; fast: its warm-up epochs
        "total_s": total,
        "epoch_s": [round(t, 1) for _, _, t in kd_evals],  # seconds from the KD invocation's start to each KD epoch's evaluation
        "ref_repo": ref.repo,
        "ref_commit": git(d, "rev-parse", "HEAD").strip(),
        "ref_method": ref.method,
        "ref_args": [argv for _, argv in invs],
        "ref_budget": budget,
        "ref_logs": logs,
        "mode": "reference",
        "synthesis_method": key,
        "commit": commit,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "load": {"start": list(load_start), "end": list(load_end)},
        "cpu": host_cpu,
        "ref_cpu_capability": env_info["capability"],
        "versions": env_info["versions"],  # the reference virtualenv's (the numbers depend on these)
        "torch_threads": env_info["threads"],
        "teacher_top1": state["teacher_top1"],
        "teacher_top1_ref": state["teacher_top1_ref"].get(key),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "run_dir": str(run_dir),
    }


def run(args) -> None:
    sc = Scratch(args.scratch)
    if not sc.state.exists():
        raise SystemExit(f"error: {sc.state} missing: run `python benchmarks/ref_parity.py prepare` first")
    state = json.loads(sc.state.read_text())
    budget = bench_budget(args.preset)
    results = Path(args.results).resolve()
    done = {(r.get("arm"), r.get("seed"), r.get("preset")) for r in read_results(results)}
    failed = []
    for seed in args.seeds:
        for key in args.ref:
            arm = REFS[key].arm
            if (arm, seed, args.preset) in done and not args.rerun:
                print(json.dumps({"skipped": arm, "seed": seed, "reason": f"already in {results}"}), flush=True)
                continue
            row = run_one(key, seed, args, sc, budget, state)
            if row is None:
                failed.append((arm, seed))
                continue
            append_result(results, row)
            done.add((arm, seed, args.preset))
            print(json.dumps({k: row[k] for k in ("arm", "seed", "top1", "epochs", "wall_s", "bank_s", "total_s")}), flush=True)
    if failed:
        raise SystemExit(f"error: failed: {failed}")


def status(args) -> None:
    sc = Scratch(args.scratch)
    for r in read_results(Path(args.results)):
        if str(r.get("arm", "")).startswith("ref_"):
            print(f"{r['arm']:9s} seed {r['seed']}  top-1 {r['top1']:6.2f}  epochs {r['epochs']}  wall {r['wall_s']:.0f} s + bank {r['bank_s']:.0f} s  ({r['date']})")
    for log in sorted(sc.logs.glob("ref_*.log"), key=lambda p: p.stat().st_mtime)[-2:]:
        lines = ANSI.sub("", log.read_text()).splitlines()
        evals = [m.groups() for m in map(EVAL.search, lines) if m]
        synth = sum(1 for line in lines if SYNTH_ONLY.search(line))
        age = time.time() - log.stat().st_mtime
        print(f"{log}: {synth} synthesis-only epochs, {len(evals)} KD epochs evaluated, last {evals[-1] if evals else '-'}; written {age:.0f} s ago")


def show_patches(args) -> None:
    for p in all_patches(args.preset):
        print(f"{REFS[p.ref].repo}  {p.file}: {p.why}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", default="/work/scratch", help="folder of the reference copies, their venv, data, runs and logs (outside the project)")
    parser.add_argument("--preset", default=PRESET, help="the bench preset whose budget the references run at (relative to the project)")
    parser.add_argument("--results", default=str(DEFAULT_RESULTS), help="JSONL file the results are appended to")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="venv, CIFAR-10 pickles, converted teacher, patches, teacher check")
    p = sub.add_parser("run", help="run references x seeds (seeds outermost), appending one line each")
    p.add_argument("--ref", nargs="+", choices=list(REFS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--rerun", action="store_true", help="run (arm, seed) pairs the results file already holds (appends another line)")
    sub.add_parser("status", help="reference lines in the results file and the latest logs")
    sub.add_parser("patches", help="every patch made to the copies, in words")
    args = parser.parse_args()
    {"prepare": prepare, "run": run, "status": status, "patches": show_patches}[args.cmd](args)


if __name__ == "__main__":
    main()

"""Write the legacy fixtures: checkpoints by the per-task LightningModules (main at d887177) + outputs.

How they were made (the code that writes them is the OLD one, from a worktree of that commit)::

    git -C <repo> worktree add /tmp/old_d887177 d887177
    OMP_NUM_THREADS=1 python tests/data/legacy/make_legacy.py --repo /tmp/old_d887177 --out tests/data/legacy
    git -C <repo> worktree remove /tmp/old_d887177

For each of ``seg`` (UPerNet + aux head), ``depth`` (DPT), ``det`` (Mask R-CNN) and ``multitask``
(seg + depth) it runs the old ``train.py`` job for 2 steps on toy data with a very small
SigLIP-shaped backbone (16 wide, 4 blocks), keeps ``last.ckpt`` as ``<name>.ckpt`` and stores in
``<name>_outputs.pt``, computed by the old code on the loaded checkpoint: the model's outputs on
a fixed input (eval mode) and the training loss of a fixed batch (train mode, seeded); the inputs
are not stored, :func:`fixed_batches` regenerates them from a seeded generator. Only ``seg.ckpt``
keeps its optimizer state (the resume test reads it; the others drop it for size). Also
the metrics of old ``tools/eval.py`` on freshly generated toy data (``<name>_eval.json``;
``TOY`` below gives the sizes the test regenerates). ``environment.json`` records what bit-identity
with these files depends on (:func:`environment`: torch version and build, the CPU kernels torch
dispatches to, the thread count, numpy): the test compares bit for bit only where all of it matches.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

ARCH = (
    "{embed_dim:16,depth:4,num_heads:2,mlp_dim:32,patch_size:16,img_size:[128,128],norm_eps:1.0e-6,"
    "act_layer:gelu_tanh,has_head:false,arch:vit_tiny_patch16_siglip_128,mean:[0.5,0.5,0.5],"
    "std:[0.5,0.5,0.5],pos_resample:timm,pos_grid:null,head_norm_eps:null,head_act_layer:null}"
)
# toy datasets (name -> (layout, num_train, num_val)); seed 0 as ensure_toy_data's default
TOY = {"toy_seg": ("ade20k", 8, 2), "toy_depth": ("nyu", 8, 2), "toy_det": ("coco", 8, 2)}
COMMON = [
    f"+backbone.arch_config={ARCH}",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=2",
    "+trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "num_vis=0",
    "seed=0",
]
SEG = ["task.head.channels=16", "task.aux_head.channels=8", "backbone.out_indices=[0,1,2,3]"]
DEPTH = ["task.head.features=16", "task.head.out_channels=[16,16,32,32]", "task.head.head_channels=8"]
DEPTH += ["backbone.out_indices=[0,1,2,3]"]
RUNS: dict[str, list[str]] = {
    "seg": ["experiment=toy_seg", "data.batch_size=2", "data.num_workers=0", *SEG],
    "depth": ["experiment=toy_depth", "data.batch_size=2", "data.num_workers=0", *DEPTH],
    "det": [
        "experiment=toy_det",
        "data.batch_size=2",
        "data.num_workers=0",
        "backbone.out_indices=[3]",
        "neck.out_channels=16",
        "task.detector.representation_size=32",
        "task.detector.mask_head_channels=8",
    ],
    "multitask": [
        "experiment=toy_multitask",
        "data.num_workers=0",
        "data.batch_size=2",
        "data.datamodules.depth.toy_num_train=8",
        "data.datamodules.depth.toy_num_val=2",
        "backbone.out_indices=[0,1,2,3]",
        "task.tasks.seg.head.channels=16",
        "task.tasks.seg.aux_head.channels=8",
        "task.tasks.depth.head.features=16",
        "task.tasks.depth.head.out_channels=[16,16,32,32]",
        "task.tasks.depth.head.head_channels=8",
    ],
}


ENVIRONMENT_FILE = "environment.json"


def environment(torch: Any) -> dict[str, Any]:
    """What float results depend on beyond the code: the torch version and build, the SIMD kernels it
    dispatches to on this CPU (``AVX512``, ``AVX2``, ...; ``ATEN_CPU_CAPABILITY`` forces one), the
    intra-op thread count (reductions are split per thread) and numpy (the metrics)."""
    import numpy

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
    }


def fixed_batches(torch: Any) -> dict[str, Any]:
    """The fixed inputs (seeded): an image, a seg / depth / detection training batch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 40, 56, generator=g)
    images = torch.randn(2, 3, 128, 128, generator=g)
    mask = torch.randint(0, 3, (2, 128, 128), generator=g)
    mask[:, :8] = 255
    depth = torch.rand(2, 128, 128, generator=g) * 5 + 0.5
    det_images = [torch.randn(3, 128, 160, generator=g), torch.randn(3, 96, 128, generator=g)]
    boxes = [
        torch.tensor([[10.0, 12.0, 70.0, 80.0], [50.0, 20.0, 120.0, 90.0]]),
        torch.tensor([[5.0, 5.0, 60.0, 50.0]]),
    ]
    targets = []
    for (h, w), b in zip(((128, 160), (96, 128)), boxes):
        masks = torch.zeros(len(b), h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(b.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": b, "labels": torch.arange(len(b)) % 3, "masks": masks})
    return {
        "x": x,
        "seg": {"image": images, "mask": mask},
        "depth": {"image": images, "depth": depth},
        "det": {"image": det_images, "target": targets, "meta": [{"path": "a"}, {"path": "b"}]},
    }


def outputs_of(name: str, task: Any, torch: Any) -> dict[str, Any]:
    """The old code's outputs on the fixed inputs (eval) and its training loss (train, seeded)."""
    batches = fixed_batches(torch)
    x = batches["x"]
    out: dict[str, Any] = {}
    task.eval()
    with torch.no_grad():
        if name in ("seg", "depth"):
            out["output"] = task(x)
        elif name == "det":
            # the 10 best detections (sorted by score): their masks are what makes the file large
            out["output"] = {k: v[:10].clone() for k, v in task.detect([x[0]])[0].items()}
        else:
            out["output"] = {n: task.model.tasks[n](x) for n in ("seg", "depth")}
    task.train()
    torch.manual_seed(0)
    if name == "multitask":
        out["loss"] = task.training_step({"seg": batches["seg"], "depth": batches["depth"]}, 0).detach()
    else:
        out["loss"] = task.training_step(batches[name], 0).detach()
    task.eval()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, required=True, help="a worktree of the old commit (d887177)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(args.repo.resolve()))
    import torch

    from siglip_dense.checkpoints import load_model
    from siglip_dense.data.toy import ensure_toy_data
    from siglip_dense.evaluate import run_eval
    from siglip_dense.train import run_train
    from tests.conftest import compose_cfg, compose_train_cfg

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / ENVIRONMENT_FILE).write_text(json.dumps(environment(torch), indent=1, sort_keys=True) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        for toy, (layout, num_train, num_val) in TOY.items():
            ensure_toy_data(data_dir / toy, num_train=num_train, num_val=num_val, layout=layout)
        for name, overrides in RUNS.items():
            run_dir = Path(tmp) / name
            run_train(compose_train_cfg([*overrides, *COMMON], run_dir, data_dir=data_dir))
            ckpt = args.out / f"{name}.ckpt"
            shutil.copy(run_dir / "checkpoints" / "last.ckpt", ckpt)
            if name != "seg":  # size: only seg keeps its optimizer state (the resume test reads it)
                raw = torch.load(ckpt, map_location="cpu", weights_only=True)
                for key in ("optimizer_states", "lr_schedulers"):
                    raw.pop(key, None)
                torch.save(raw, ckpt)
            task = load_model(ckpt)
            torch.save(outputs_of(name, task, torch), args.out / f"{name}_outputs.pt")
            eval_over = [f"ckpt_path={ckpt}", f"output_dir={Path(tmp) / ('eval_' + name)}"]
            if name == "multitask":
                eval_over += [f"data.datamodules.seg.root={data_dir / 'toy_seg'}"]
                eval_over += [f"data.datamodules.depth.root={data_dir / 'toy_depth'}"]
                eval_over += ["data.datamodules.seg.num_workers=0", "data.datamodules.depth.num_workers=0"]
            else:
                eval_over += [f"data.root={data_dir / ('toy_' + name)}", "data.num_workers=0"]
            metrics = run_eval(compose_cfg("eval", eval_over, Path(tmp) / f"hydra_{name}"))
            (args.out / f"{name}_eval.json").write_text(json.dumps(metrics, indent=1, sort_keys=True))
            print(f"{name}: {ckpt.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""``elanet viz attention|pruning|scorecam|speed|study``: draw what ELA did from a run folder, checkpoint or benchmark."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.distributed import resolve_device
from ..viz import figure


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="folder for the picture (default: the run folder, or beside the input file)")
    p.add_argument("--format", choices=figure.FORMATS, default="png", dest="fmt", help="image format (default png)")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefer", choices=["last", "best"], default="last",
                   help="which checkpoint of a run folder (default last: the final pruned structure)")
    p.add_argument("--data-dir", help="dataset folder (default: the checkpoint's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... or auto (default cpu)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="viz_command", metavar="WHAT", required=True)
    a = sub.add_parser("attention", help="mean layer-attention heatmap per stage (paper Figures 2a, 6, 7)")
    a.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN", help="a .pt file or a run folder")
    a.add_argument("--images", type=int, default=64, help="test images to average over (default 64)")
    _model_args(a)
    _common(a)
    r = sub.add_parser("pruning", help="scores, EBQM values, tau and the mask of every pruning round (Figure 1)")
    r.add_argument("run", metavar="RUN", help="a run folder (its pruning.json) or a pruning.json file")
    _common(r)
    s = sub.add_parser("scorecam", help="Score-CAM maps of blocks' attention outputs for one image (Figures 3, 5)")
    s.add_argument("checkpoint", metavar="CHECKPOINT", help="a .pt file or a run folder")
    s.add_argument("--image", type=Path, help="PNG/JPEG file (default: the first test image of the dataset, "
                                              "or the bundled digits image)")
    s.add_argument("--blocks", type=int, nargs="+", help="block indices (default: the last stage's, at most 6)")
    s.add_argument("--target", type=int, help="class to explain (default: the predicted class)")
    s.add_argument("--batch-size", type=int, default=64, help="masked images per forward pass (default 64)")
    _model_args(s)
    _common(s)
    b = sub.add_parser("speed", help="training time against depth per variant (Figure 4)")
    b.add_argument("bench", metavar="BENCH_JSON", help="benchmark JSON written by `elanet bench`")
    _common(b)
    t = sub.add_parser("study", help="accuracy against training time and per-block pruning frequency of a study")
    t.add_argument("study_dir", metavar="STUDY_DIR", help="a folder written by `elanet study` (its study.json and study.csv)")
    _common(t)


def _load(args: argparse.Namespace):
    from ..training.checkpoint import load_checkpoint, model_from_checkpoint

    ckpt = load_checkpoint(args.checkpoint, prefer=args.prefer)
    model = model_from_checkpoint(ckpt, device=resolve_device(args.device))
    src = Path(args.checkpoint)
    return ckpt, model, args.out or (src if src.is_dir() else src.parent)


def _attention(args: argparse.Namespace) -> Path:
    from ..viz import draw_attention
    from ..viz.inputs import dataset_images

    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    ckpt, model, out = _load(args)
    images = dataset_images(ckpt, args.images, data_dir=args.data_dir)
    n = images.shape[0]
    title = (f"{ckpt['model_name']}: mean layer attention over {n} test image{'s' * (n != 1)} and all heads "
             "(block index = ELA mask index)")
    return draw_attention(model, images, out, fmt=args.fmt, title=title)


def _pruning(args: argparse.Namespace) -> Path:
    from ..viz import draw_pruning

    src = Path(args.run)
    path = src / "pruning.json" if src.is_dir() else src
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run folder of an ELA model written by `elanet train` "
                                "after its first pruning window")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rounds"), list):
        raise ValueError(f"{path} has no 'rounds' list: pass the pruning.json written by `elanet train`")
    title = f"{data.get('model', 'ELA')}: KL divergence → EBQM → threshold τ → mask (red: pruned)"
    return draw_pruning(data["rounds"], args.out or path.parent, fmt=args.fmt, title=title)


def _scorecam(args: argparse.Namespace) -> Path:
    from ..viz import draw_scorecam
    from ..viz.inputs import checkpoint_normalisation, load_image, sample_image, to_display

    ckpt, model, out = _load(args)
    norm = checkpoint_normalisation(ckpt)
    image = load_image(args.image, norm) if args.image else sample_image(ckpt, data_dir=args.data_dir)
    return draw_scorecam(model, image, out, blocks=args.blocks, target=args.target, display=to_display(image[0], norm),
                         fmt=args.fmt, batch_size=args.batch_size, classes=ckpt.get("classes"))


def _speed(args: argparse.Namespace) -> Path:
    from ..viz import draw_speed, read_bench

    records = read_bench(args.bench)
    return draw_speed(records, args.out or Path(args.bench).parent, fmt=args.fmt)


def _study(args: argparse.Namespace) -> list[Path]:
    from ..study.results import read_study_csv, setting_rows
    from ..viz.study import draw_study

    src = Path(args.study_dir)
    if not (src / "study.json").is_file() or not (src / "study.csv").is_file():
        raise FileNotFoundError(f"{src} holds no study.json and study.csv: pass a folder written by `elanet study`")
    record = json.loads((src / "study.json").read_text())
    settings = setting_rows(record["axes"], read_study_csv(src / "study.csv"))
    if not any("best" in s for s in settings):
        raise ValueError(f"{src} has no finished runs yet: nothing to draw")
    title = f"study {record['identity']['name']} on {record['dataset']}"
    return draw_study(settings, args.out or src, title=title, fmt=args.fmt)


def run(args: argparse.Namespace) -> int:
    draw = {"attention": _attention, "pruning": _pruning, "scorecam": _scorecam, "speed": _speed, "study": _study}[args.viz_command]
    result = draw(args)
    for path in result if isinstance(result, list) else [result]:
        print(f"wrote {path}")
    return 0

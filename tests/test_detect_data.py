"""COCO reader, synthetic set and COCOeval wrapper of elanet.detect, on files written by the tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("pycocotools")
from pycocotools import mask as mask_utils  # noqa: E402

from elanet.detect.coco import CocoDetection, DetectionLoader, coco_paths, read_coco_json  # noqa: E402
from elanet.detect.evaluate import coco_evaluate, load_coco_gt, to_coco_results  # noqa: E402
from elanet.detect.synthetic import make_synthetic_coco  # noqa: E402


def _write_png(path: Path, h: int, w: int) -> None:
    from PIL import Image

    Image.fromarray(np.random.RandomState(0).randint(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def tiny_coco(root: Path, split: str = "train2017") -> Path:
    """Three 20x30 images: polygon, uncompressed RLE and compressed RLE masks, a crowd, a degenerate box, one empty image."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    h, w = 20, 30
    for i in (1, 2, 3):
        _write_png(root / split / f"{i}.png", h, w)
    square = np.zeros((h, w), np.uint8)
    square[5:15, 10:20] = 1  # 10x10 at x=10, y=5
    compressed = mask_utils.encode(np.asfortranarray(square))["counts"].decode("ascii")
    # ... and the same mask in uncompressed RLE: column-major run lengths starting with zeros
    flat = square.flatten(order="F")
    runs, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            runs.append(n)
            cur, n = v, 0
        n += 1
    runs.append(n)
    anns = [
        {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 8, 6], "iscrowd": 0, "area": 48,
         "segmentation": [[2, 3, 10, 3, 10, 9, 2, 9]]},  # polygon rectangle
        {"id": 2, "image_id": 1, "category_id": 3, "bbox": [10, 5, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": {"size": [h, w], "counts": runs}},  # uncompressed RLE
        {"id": 3, "image_id": 2, "category_id": 3, "bbox": [10, 5, 10, 10], "iscrowd": 0, "area": 100,
         "segmentation": {"size": [h, w], "counts": compressed}},  # compressed RLE
        {"id": 4, "image_id": 2, "category_id": 7, "bbox": [29.5, 1, 4, 4], "iscrowd": 0, "area": 8,
         "segmentation": [[29.5, 1, 30, 1, 30, 5, 29.5, 5]]},  # degenerate after clipping: 0.5 px wide
        {"id": 5, "image_id": 2, "category_id": 7, "bbox": [0, 0, 5, 5], "iscrowd": 1, "area": 25,
         "segmentation": {"size": [h, w], "counts": runs}},  # crowd
    ]
    doc = {"images": [{"id": i, "file_name": f"{i}.png", "width": w, "height": h} for i in (1, 2, 3)],
           "annotations": anns, "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    ann = root / "annotations" / f"instances_{split}.json"
    ann.write_text(json.dumps(doc))
    return ann


def test_reader_boxes_masks_and_empty_images(tmp_path: Path) -> None:
    tiny_coco(tmp_path)
    ds = CocoDetection(*coco_paths(tmp_path, "train2017"), masks=True)
    assert len(ds) == 3 and ds.num_classes == 3 and ds.category_ids == [3, 7] and ds.classes == ["three", "seven"]
    assert ds.dropped == 1 and ds.crowd == 1
    img, t = ds[0]
    assert img.shape == (3, 20, 30) and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
    assert t["labels"].tolist() == [2, 1]  # category 7 -> label 2, category 3 -> label 1
    assert t["boxes"].tolist() == [[2, 3, 10, 9], [10, 5, 20, 15]]
    assert t["masks"].shape == (2, 20, 30) and t["masks"].dtype == torch.uint8
    assert t["masks"][1].sum() == 100 and t["masks"][1, 5:15, 10:20].all()  # uncompressed RLE decoded
    assert 48 <= t["masks"][0].sum() <= 8 * 6 + 8 + 6 + 1  # polygon rasterised around its 8x6 outline
    _, t2 = ds[1]
    assert t2["labels"].tolist() == [1] and torch.equal(t2["masks"][0], t["masks"][1])  # compressed == uncompressed
    _, t3 = ds[2]
    assert t3["boxes"].shape == (0, 4) and t3["masks"].shape == (0, 20, 30) and t3["labels"].shape == (0,)


def test_flip_moves_boxes_with_the_pixels(tmp_path: Path) -> None:
    tiny_coco(tmp_path)
    plain = CocoDetection(*coco_paths(tmp_path, "train2017"), masks=True)
    flipped = CocoDetection(*coco_paths(tmp_path, "train2017"), masks=True, flip=True)
    seen = set()
    for epoch in range(8):
        flipped.set_epoch(epoch)
        img, t = flipped[1]
        ref_img, ref = plain[1]
        did = not torch.equal(img, ref_img)
        seen.add(did)
        if did:
            assert torch.equal(img, ref_img.flip(-1)) and torch.equal(t["masks"], ref["masks"].flip(-1))
            assert t["boxes"].tolist() == [[30 - 20, 5, 30 - 10, 15]]
            m = t["masks"][0].nonzero()
            assert m[:, 1].min() == 10 and m[:, 1].max() == 19  # the mask's columns match the flipped box
        flipped.set_epoch(epoch)
        assert torch.equal(flipped[1][0], img)  # the decision is a function of (seed, epoch, index)
    assert seen == {True, False}


def test_loader_shards_and_skips(tmp_path: Path) -> None:
    tiny_coco(tmp_path)
    ds = CocoDetection(*coco_paths(tmp_path, "train2017"), masks=False)
    full = DetectionLoader(ds, 1, train=True, seed=3)
    full.set_epoch(2)
    ids = [int(t[0]["image_id"]) for _, t in full]
    assert sorted(ids) == [1, 2, 3]
    assert [int(t[0]["image_id"]) for _, t in full.iter_from(1)] == ids[1:]
    val = [DetectionLoader(ds, 2, train=False, rank=r, world_size=2) for r in (0, 1)]
    assert sorted(int(t["image_id"]) for v in val for _, ts in v for t in ts) == [1, 2, 3]


def _expect_error(tmp_path: Path, edit, match: str, *, masks: bool = True, exc=ValueError) -> None:
    ann = tiny_coco(tmp_path)
    edit(ann)
    with pytest.raises(exc, match=match):
        CocoDetection(*coco_paths(tmp_path, "train2017"), masks=masks)


def test_bad_inputs_name_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="COCO 2017 layout"):
        coco_paths(tmp_path, "train2017")
    _expect_error(tmp_path / "a", lambda a: a.write_text("{not json"), r"instances_train2017.json is not valid JSON \(line 1")

    def bad_image(a: Path) -> None:
        d = json.loads(a.read_text())
        d["annotations"][0]["image_id"] = 99
        a.write_text(json.dumps(d))

    _expect_error(tmp_path / "b", bad_image, "refers to image_id 99, which is not in 'images'")

    def bad_cat(a: Path) -> None:
        d = json.loads(a.read_text())
        d["annotations"][0]["category_id"] = 5
        a.write_text(json.dumps(d))

    _expect_error(tmp_path / "c", bad_cat, "category_id 5, which is missing from 'categories'")
    _expect_error(tmp_path / "d", lambda a: (a.parent.parent / "train2017" / "2.png").unlink(), "1 image.*missing.*first: 2.png",
                  exc=FileNotFoundError)

    def box_only(a: Path) -> None:
        d = json.loads(a.read_text())
        for x in d["annotations"]:
            x.pop("segmentation")
        a.write_text(json.dumps(d))

    _expect_error(tmp_path / "e", box_only, "no instance masks.*faster_rcnn")
    ann = tmp_path / "e" / "annotations" / "instances_train2017.json"
    assert len(CocoDetection(ann, tmp_path / "e" / "train2017", masks=False)) == 3  # fine for a box-only detector
    with pytest.raises(ValueError, match="needs 'images', 'annotations' and 'categories'"):
        (tmp_path / "f.json").write_text("[]")
        read_coco_json(tmp_path / "f.json")


def _gt(tmp_path: Path):
    """Two 100x100 images with one 20x20 object (category 3) each and one 60x60 object (category 7) on image 2."""
    ann = tmp_path / "gt.json"
    boxes = {1: [(3, [10, 10, 20, 20])], 2: [(3, [50, 50, 20, 20]), (7, [5, 5, 60, 60])]}
    anns = []
    for img, objs in boxes.items():
        for c, (x, y, w, h) in objs:
            anns.append({"id": len(anns) + 1, "image_id": img, "category_id": c, "bbox": [x, y, w, h], "area": w * h,
                         "iscrowd": 0, "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    ann.write_text(json.dumps({"images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 100} for i in (1, 2)],
                               "annotations": anns, "categories": [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}]}))
    return load_coco_gt(ann), anns


def test_cocoeval_known_ap(tmp_path: Path) -> None:
    gt, anns = _gt(tmp_path)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9} for a in anns]
    m = coco_evaluate(gt, perfect, "bbox")
    assert m["AP"] == pytest.approx(100.0) and m["AP50"] == pytest.approx(100.0) and m["APl"] == -1.0
    # category 3: one of its two objects found -> precision 1 up to recall 0.5: 51 of 101 recall points
    half = [p for p in perfect if not (p["category_id"] == 3 and p["image_id"] == 2)]
    m = coco_evaluate(gt, half, "bbox")
    assert m["AP"] == pytest.approx(100.0 * (51 / 101 + 1) / 2, abs=1e-6)
    assert m["APs"] == pytest.approx(100.0 * 51 / 101, abs=1e-6) and m["APm"] == pytest.approx(100.0)
    # a confident false positive ranked first: interpolated precision 2/3 at every recall of category 3
    fp = perfect + [{"image_id": 1, "category_id": 3, "bbox": [70, 70, 20, 20], "score": 0.95}]
    assert coco_evaluate(gt, fp, "bbox")["APs"] == pytest.approx(100.0 * 2 / 3, abs=1e-6)
    # empty predictions: zero, not an exception
    assert coco_evaluate(gt, [], "bbox")["AP"] == 0.0 and coco_evaluate(gt, [], "segm")["AP50"] == 0.0


def test_results_format_and_segm_ap(tmp_path: Path) -> None:
    gt, anns = _gt(tmp_path)
    outputs, ids = [], []
    for img in (1, 2):
        objs = [a for a in anns if a["image_id"] == img]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in objs)], dtype=torch.float32)
        masks = torch.zeros(len(objs), 1, 100, 100)
        for k, (x, y, w, h) in enumerate(a["bbox"] for a in objs):
            masks[k, 0, y:y + h, x:x + w] = 0.9
        outputs.append({"boxes": boxes, "scores": torch.full((len(objs),), 0.8), "masks": masks,
                        "labels": torch.tensor([1 if a["category_id"] == 3 else 2 for a in objs])})
        ids.append(img)
    outputs.append({"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.int64),
                    "masks": torch.zeros(0, 1, 100, 100)})
    ids.append(1)
    bbox, segm = to_coco_results(outputs, ids, [3, 7], masks=True)
    assert len(bbox) == len(segm) == 3
    assert bbox[0] == {"image_id": 1, "category_id": 3, "bbox": [10.0, 10.0, 20.0, 20.0], "score": 0.8}
    assert isinstance(segm[0]["segmentation"]["counts"], str)
    json.dumps(segm)  # COCO results format is plain JSON
    assert coco_evaluate(gt, bbox, "bbox")["AP"] == pytest.approx(100.0)
    assert coco_evaluate(gt, segm, "segm")["AP"] == pytest.approx(100.0)


def test_synthetic_set_is_deterministic_coco(tmp_path: Path) -> None:
    a = make_synthetic_coco(tmp_path / "a")
    b = make_synthetic_coco(tmp_path / "b")
    for split, n in (("train2017", 1000), ("val2017", 100)):
        ja, jb = (json.loads((r / "annotations" / f"instances_{split}.json").read_text()) for r in (a, b))
        assert ja == jb and len(ja["images"]) == n
        per_image = np.bincount([x["image_id"] for x in ja["annotations"]], minlength=n + 1)[1:]
        assert per_image.min() >= 4 and per_image.max() <= 10 and per_image.mean() > 6  # dense canvases
        assert (a / split / "000000.png").read_bytes() == (b / split / "000000.png").read_bytes()
    ds = CocoDetection(*coco_paths(a, "val2017"), masks=True)
    _, t = ds[0]
    boxes, masks = t["boxes"], t["masks"]
    for box, m in zip(boxes, masks):  # each box is the tight box of its mask and boxes do not overlap
        ys, xs = m.nonzero(as_tuple=True)
        assert box.tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    from torchvision.ops import box_iou

    iou = box_iou(boxes, boxes)
    assert (iou - torch.eye(len(boxes))).abs().max() == 0
    assert make_synthetic_coco(tmp_path / "a") == a  # reused, not rewritten

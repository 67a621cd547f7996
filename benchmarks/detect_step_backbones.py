"""1-thread process-CPU time of a Mask R-CNN training step (batch 4, 128 px, 300 proposals) per backbone and head set.

Usage: python benchmarks/detect_step_backbones.py [--rois 32] resnet18_ela resnet50_ela
Each backbone runs with torchvision's default heads (256-ch FPN, 1024-d box head, 4x256 mask convs) and with
the embedded job's light heads (64-ch FPN, 256-d box head, 2x64 mask convs); --rois sampled RoIs per image.
"""
import argparse, time, torch
from elanet.detect.detectors import create_detector
p = argparse.ArgumentParser(); p.add_argument("--rois", type=int, default=32); p.add_argument("backbones", nargs="+")
args = p.parse_args()
torch.set_num_threads(1); torch.manual_seed(0)
LIGHT = dict(fpn_channels=64, box_head_dim=256, mask_head_channels=64, mask_head_convs=2)
imgs = [torch.rand(3, 128, 128) for _ in range(4)]
tg = []
for _ in range(4):
    b = torch.tensor([[10., 10., 50., 50.], [60., 60., 110., 100.]])
    mk = torch.zeros(2, 128, 128, dtype=torch.uint8); mk[0, 10:50, 10:50] = 1; mk[1, 60:100, 60:110] = 1
    tg.append(dict(boxes=b, labels=torch.tensor([1, 2]), masks=mk))
for name in args.backbones:
    for heads, kw in (("default", {}), ("light", LIGHT)):
        m = create_detector("mask_rcnn", backbone=name, num_classes=11, min_size=128, max_size=128,
                            rpn_post_nms_top_n_train=300, box_batch_size_per_image=args.rois, **kw).train()
        opt = torch.optim.SGD(m.parameters(), lr=0.001)
        ts = []
        for i in range(4):
            t = time.process_time()
            loss = sum(m(imgs, tg).values()); opt.zero_grad(); loss.backward(); opt.step()
            ts.append(time.process_time() - t)
        print(f"{name} {heads} heads, {args.rois} RoIs: median of steps 2-4 {sorted(ts[1:])[1]:.2f} s", [f"{x:.2f}" for x in ts], flush=True)

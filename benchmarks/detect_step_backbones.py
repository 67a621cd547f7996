"""1-thread process-CPU time of a Mask R-CNN training step (batch 4, 128 px, the embedded job's RoI settings) per backbone.

Usage: python benchmarks/detect_step_backbones.py resnet18_ela resnet50_ela
"""
import sys, time, torch
from elanet.detect.detectors import create_detector
torch.set_num_threads(1); torch.manual_seed(0)
res = {}
for name in sys.argv[1:]:
    m = create_detector("mask_rcnn", backbone=name, num_classes=11, min_size=128, max_size=128,
                        rpn_post_nms_top_n_train=300, box_batch_size_per_image=32).train()
    opt = torch.optim.SGD(m.parameters(), lr=0.001)
    imgs = [torch.rand(3, 128, 128) for _ in range(4)]
    tg = []
    for _ in range(4):
        b = torch.tensor([[10., 10., 50., 50.], [60., 60., 110., 100.]])
        mk = torch.zeros(2, 128, 128, dtype=torch.uint8); mk[0, 10:50, 10:50] = 1; mk[1, 60:100, 60:110] = 1
        tg.append(dict(boxes=b, labels=torch.tensor([1, 2]), masks=mk))
    ts = []
    for i in range(4):
        t = time.process_time()
        loss = sum(m(imgs, tg).values()); opt.zero_grad(); loss.backward(); opt.step()
        ts.append(time.process_time() - t)
    res[name] = sorted(ts[1:])[1]
    print(name, [f"{x:.2f}" for x in ts], flush=True)

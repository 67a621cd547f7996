"""Run by tests/test_detect_train.py under torchrun: train a detector, then write this rank's mask and weight sums."""
import json
import os
import sys

import torch

from elanet.detect import task
from elanet.detect.config import DetectConfig
from elanet.pruning import get_mask

cfg = DetectConfig(**json.loads(sys.argv[1]))
out = sys.argv[2]
captured = {}
original = task.create_detector


def capture(*args, **kwargs):  # keep a handle on the model this rank trains
    captured["model"] = original(*args, **kwargs)
    return captured["model"]


task.create_detector = capture
summary = task.train_detector(cfg)
rank = int(os.environ.get("RANK", 0))
model = captured["model"]
state = {k: v.double().sum().item() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"mask": get_mask(model), "weights": state, "summary": summary}, f)

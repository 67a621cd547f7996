"""Run by tests/test_train.py under torchrun: train, then write this rank's mask and weight checksum."""
import json
import sys

import torch

from elanet.pruning import get_mask
from elanet.training import TrainConfig, train
from elanet.training import trainer

cfg = TrainConfig(**json.loads(sys.argv[1]))
out = sys.argv[2]
captured = {}
original = trainer.create_model


def capture(*args, **kwargs):  # keep a handle on the model this rank trains
    captured["model"] = original(*args, **kwargs)
    return captured["model"]


trainer.create_model = capture
summary = train(cfg)
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ.get("RANK", 0))
model = captured["model"]
state = {k: v.double().sum().item() for k, v in model.state_dict().items() if torch.is_tensor(v) and v.is_floating_point()}
with open(f"{out}/rank{rank}.json", "w") as f:
    json.dump({"mask": get_mask(model), "weights": state, "summary": summary}, f)

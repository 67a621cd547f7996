"""Run by tests/test_resume.py under torchrun: train (or resume) a run; in 'cut' mode rank 0 marks step
(2, 2) and waits there so that the test can send SIGTERM to torchrun itself, which forwards it to the workers."""
import json
import sys
import time
from pathlib import Path

from elanet.training import TrainConfig, train

cfg_json, mode, marker = sys.argv[1], sys.argv[2], Path(sys.argv[3])
cfg = TrainConfig(**json.loads(cfg_json))
rank = int(__import__("os").environ["RANK"])


def hold(epoch: int, step: int) -> None:
    if mode == "cut" and rank == 0 and (epoch, step) == (2, 2):
        marker.write_text("at 2,2")
        time.sleep(5)  # the SIGTERM arrives while this step is finishing


summary = train(cfg, resume=cfg.out if mode == "resume" else None, on_step=hold, log=lambda s: None)
if rank == 0:
    marker.with_suffix(".summary").write_text(json.dumps(summary))

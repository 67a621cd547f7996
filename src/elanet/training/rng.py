"""The random stream of training steps, owned by the trainer and saved per rank.

Models draw their randomness (DropPath, dropout) from torch's default generators. Anything else that
draws from them between steps -- creating a DataLoader iterator draws its workers' base seed, a library
may draw too -- would shift that stream and break an exact resume. :class:`StepRNG` keeps the steps'
stream in its own ``torch.Generator`` objects and swaps it in only for the duration of a step.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch

__all__ = ["StepRNG"]


class StepRNG:
    """One rank's step stream: a CPU generator, plus a CUDA one when training on a GPU.

    Args:
        device: the training device (its CUDA generator is swapped too).

    Example::

        rng = StepRNG(device)
        rng.seed(1234)
        with rng.active():
            loss = model(x).sum()  # DropPath draws from rng, not from whatever ran before
        state = rng.state_dict()   # per rank, into the checkpoint
    """

    def __init__(self, device: torch.device) -> None:
        self.device = torch.device(device)
        self.cpu = torch.Generator()
        self.cuda = torch.Generator(self.device) if self.device.type == "cuda" else None

    def seed(self, seed: int) -> None:
        """Restart the stream from ``seed``."""
        self.cpu.manual_seed(seed)
        if self.cuda is not None:
            self.cuda.manual_seed(seed)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this stream torch's default generators' state inside the block, then put theirs back."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.cpu.get_state())
        if self.cuda is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda.get_state(), self.device)
        try:
            yield
        finally:
            self.cpu.set_state(torch.get_rng_state())
            torch.set_rng_state(outer)
            if self.cuda is not None:
                self.cuda.set_state(torch.cuda.get_rng_state(self.device))
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"cpu": self.cpu.get_state(), "cuda": None if self.cuda is None else self.cuda.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cpu.set_state(state["cpu"])
        if self.cuda is not None:
            if state.get("cuda") is None:
                raise ValueError("the checkpoint was written by a CPU run; resume it on the CPU (--device cpu)")
            self.cuda.set_state(state["cuda"])

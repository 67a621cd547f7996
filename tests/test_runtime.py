"""elanet.runtime: the malloc setting the command applies (freed large blocks are reused, not re-faulted)."""
import os
import subprocess
import sys
import textwrap

import pytest

SIZES_MIB = (40, 8, 80, 16, 40, 48, 3)  # a training step's large transient buffers, allocated and freed each step
# four "steps" of allocating and freeing those blocks; prints the page faults of steps 2-4
_PROBE = textwrap.dedent(f"""
    import resource, torch
    from elanet.runtime import keep_freed_memory
    on = keep_freed_memory()
    faults = []
    for step in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        held = [torch.empty(n * 2**20 // 4).fill_(1.0) for n in {SIZES_MIB}]
        del held
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(on, sum(faults[1:]))
""")


def _probe(malloc: str | None) -> tuple[bool, int]:
    env = {k: v for k, v in os.environ.items() if k != "ELANET_MALLOC"}
    if malloc is not None:
        env["ELANET_MALLOC"] = malloc
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the setting is glibc's")
def test_freed_blocks_are_reused_without_page_faults():
    kept, faults = _probe(None)
    system, faults_system = _probe("system")
    assert kept and not system
    pages = 3 * sum(SIZES_MIB) * 2**20 // 4096  # re-faulting every block in steps 2-4
    assert faults_system > pages // 2  # glibc maps each large block afresh and unmaps it when freed ...
    assert faults < pages // 5  # ... the kept heap serves the next step from memory already touched

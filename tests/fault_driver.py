"""pretrain.py with one fault injected, for tests/test_faults.py (not a test itself).

    python tests/fault_driver.py PRETRAIN_FLAGS...      with FAULT="kind:n" in the environment

kinds (n counts from this process's start):
  kill-step:n   SIGKILL this process right after its n-th optimizer step
  kill-save:n   SIGKILL it in the middle of its n-th torch.save: half the bytes are on disk
  term-step:n   send it SIGTERM after its n-th step (a cluster's preemption notice); under
                torchrun rank 0 only
  int-step:n    send it SIGINT after its n-th step (Ctrl-C)
  kill-rank1:n  under torchrun: rank 1 SIGKILLs itself after step n, on the first attempt only
                (TORCHELASTIC_RESTART_COUNT 0), so an elastic restart must resume the run
A fault the code handles cleanly shows in the exit code and the files; nothing here changes how
pretrain.py saves or resumes, it only decides when the process is hit.
"""
import io
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import pretrain  # noqa: E402
from util import cli  # noqa: E402
from util.engine import Engine  # noqa: E402


def inject(fault):
    kind, n = fault.split(":")
    n = int(n)
    if kind == "kill-save":
        real_save, calls = torch.save, [0]

        def dying_save(obj, path, *args, **kwargs):
            calls[0] += 1
            if calls[0] < n:
                return real_save(obj, path, *args, **kwargs)
            buffer = io.BytesIO()
            real_save(obj, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        return
    signals = {"kill-step": signal.SIGKILL, "term-step": signal.SIGTERM,
               "int-step": signal.SIGINT, "kill-rank1": signal.SIGKILL}
    if kind == "term-step" and os.environ.get("RANK", "0") != "0":
        return                                  # under torchrun only rank 0 gets the notice
    if kind == "kill-rank1":
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if os.environ.get("RANK") != "1" or not first_attempt:
            return
    real_step, steps = Engine.step, [0]

    def step_then_fault(self, *args, **kwargs):
        real_step(self, *args, **kwargs)
        steps[0] += 1
        if steps[0] == n:
            os.kill(os.getpid(), signals[kind])
    Engine.step = step_then_fault


if __name__ == "__main__":
    if os.environ.get("FAULT"):
        inject(os.environ["FAULT"])
    cli.run_cli(pretrain.main, pretrain.get_args_parser())

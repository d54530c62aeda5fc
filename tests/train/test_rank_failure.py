"""A rank killed mid-training (SIGKILL, as an OOM killer or a lost node would): torchrun fails the job with a non-zero
status instead of hanging, and the newest complete checkpoint stays loadable: training resumes from it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lmforge.train.dcp import dcp_dirs


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (torchrun's workers), read from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended while we looked
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_a_killed_rank_fails_the_job_and_the_last_checkpoint_resumes(runs):
    name = "killed"
    # far more steps than the test waits for, a checkpoint every step: the kill lands mid-step or mid-save
    args = runs.args(name, ["train.batch_size=4", "train.steps=100000", "train.ckpt_every=1", "train.keep_last=3"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "lmforge"]
    job = subprocess.Popen(
        [*cmd, "pretrain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while len(dcp_dirs(runs.root / name)) < 3 and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.05)
        assert len(dcp_dirs(runs.root / name)) >= 3, "no checkpoints written"
        workers = children(job.pid)
        assert len(workers) == 2, workers
        os.kill(max(workers), signal.SIGKILL)  # rank 1 was started second
        output, _ = job.communicate(timeout=120)
    finally:
        job.kill()
    assert job.returncode != 0
    assert "exitcode: -9" in output or "Signal 9" in output or "SIGKILL" in output, output[-3000:]

    newest = dcp_dirs(runs.root / name)[-1]
    step = int(newest.name.split("_")[1])
    # one process resumes the 2-rank checkpoint (same global batch: 1 x 8 = 2 x 4) and trains one more step
    runs.single(name, "train.batch_size=8", f"train.steps={step + 1}", "train.ckpt_every=1", resume=True)
    assert dcp_dirs(runs.root / name)[-1].name == f"step_{step + 1:06d}"
    assert runs.metrics(name, "step")[-1] == step + 1

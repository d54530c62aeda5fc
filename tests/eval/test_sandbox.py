"""The sandbox contains what a generated program can do: fork bombs, deletions, network, memory, loops, writes."""

import os
import socket
import tempfile
import time
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.eval.sandbox import SandboxConfig, run_program

FAST = SandboxConfig(timeout_s=10)  # generous: these programs end at once, but CI runs torchrun tests beside them


def in_namespace(ns: str) -> list[int]:
    """Host pids of the processes whose pid namespace is `ns` (as in `readlink /proc/self/ns/pid`)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == ns:
                pids.append(int(pid))
        except OSError:  # gone, or not ours to inspect
            pass
    return pids


@pytest.fixture(params=["user", "root"])
def isolation(request) -> str:
    if request.param == "root" and os.geteuid() != 0:
        pytest.skip("isolation=root needs root")
    return request.param


@pytest.fixture(params=["pytest", "world-writable"])
def outside(request, tmp_path):
    """A dir outside the sandbox: pytest's, and one anyone may write (under root, pytest's is 0700 and nobody is
    stopped by its mode; in the world-writable one, only the read-only mount stops the sandbox)."""
    if request.param == "pytest":
        yield tmp_path
        return
    with tempfile.TemporaryDirectory(prefix="lmforge-outside-") as path:
        os.chmod(path, 0o777)
        yield Path(path)


def test_exit_codes_and_output():
    ok = run_program("print('hello')", FAST)
    assert (ok.passed, ok.status, ok.returncode, ok.stdout) == (True, "passed", 0, "hello\n")
    bad = run_program("import sys\nprint('x' * 10000)\nsys.exit(3)", SandboxConfig(tail_chars=100))
    assert (bad.passed, bad.status, bad.returncode, bad.stdout) == (False, "failed", 3, "x" * 99 + "\n")
    crash = run_program("raise ValueError('boom')", FAST)
    assert crash.status == "failed" and "ValueError: boom" in crash.stderr


def test_fork_bomb_is_stopped_and_leaves_nothing(isolation):
    # Each process counts its successful forks and reports its pid namespace, which the test then looks for.
    bomb = (
        "import os, time\nforks = 0\n"
        "while True:\n    try:\n        os.fork(); forks += 1\n    except OSError:\n        break\n"
        "print(os.readlink('/proc/self/ns/pid'), forks, flush=True)\ntime.sleep(60)\n"
    )
    start = time.perf_counter()
    result = run_program(bomb, SandboxConfig(timeout_s=2, nproc=16, isolation=isolation))
    assert result.status == "timeout" and time.perf_counter() - start < 6
    lines = [line.split() for line in result.stdout.splitlines()]
    assert lines and all(int(forks) < 16 for _, forks in lines)  # RLIMIT_NPROC counts in the sandbox's namespace
    assert in_namespace(os.readlink("/proc/self/ns/pid"))  # the check sees processes where there are some
    assert not in_namespace(lines[0][0])  # the whole pid namespace died with it
    assert run_program("print(1)", FAST).passed  # and the machine still runs programs


def test_escaped_session_is_killed(isolation):
    escape = (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        "    print(os.readlink('/proc/self/ns/pid'), flush=True)\n    time.sleep(60)\ntime.sleep(0.5)\n"
    )
    result = run_program(escape, SandboxConfig(timeout_s=10, isolation=isolation))
    assert result.status == "passed" and not in_namespace(result.stdout.strip())


def test_host_processes_are_invisible():
    result = run_program("import os\nprint([p for p in os.listdir('/proc') if p.isdigit()])", FAST)
    assert result.stdout == "['1']\n"  # its own /proc shows pid 1, itself


def test_rm_rf_home_and_absolute_paths(outside, isolation):
    sentinel = outside / "sentinel.txt"
    sentinel.write_text("keep")
    os.chmod(sentinel, 0o666)
    real_home = os.path.expanduser("~")
    before = sorted(os.listdir(real_home))
    program = (
        "import os, shutil\nprint(os.path.expanduser('~') == os.getcwd())\n"
        f"os.system('rm -rf ~ {real_home} {outside} {sentinel} 2>/dev/null')\n"
        f"shutil.rmtree({str(outside)!r}, ignore_errors=True)\n"
    )
    result = run_program(program, SandboxConfig(timeout_s=3, isolation=isolation))
    assert result.stdout == "True\n"  # HOME is the sandbox's own dir
    assert sentinel.read_text() == "keep"
    assert sorted(os.listdir(real_home)) == before


def test_write_outside_temp_dir_fails(outside, isolation):
    target = outside / "written.txt"
    result = run_program(f"open({str(target)!r}, 'w').write('x')", SandboxConfig(timeout_s=3, isolation=isolation))
    assert result.status == "failed"
    if os.stat(outside).st_mode & 0o002 or os.geteuid() != 0:  # only the mount can have stopped it
        assert "Read-only file system" in result.stderr
    assert not target.exists()
    assert run_program("open('inside.txt', 'w').write('ok')\nprint(open('inside.txt').read())", FAST).stdout == "ok\n"


def test_no_connection_to_loopback(isolation):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):  # the listener works for us
            server.accept()[0].close()
        result = run_program(
            f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)",
            SandboxConfig(timeout_s=3, isolation=isolation),
        )
        assert result.status == "failed" and "OSError" in result.stderr
        with pytest.raises(TimeoutError):
            server.accept()


def test_huge_allocation_raises_memory_error():
    result = run_program("x = bytearray(10 * 1024**3)", FAST)
    assert result.status == "failed" and "MemoryError" in result.stderr


def test_infinite_loop_times_out():
    result = run_program("while True:\n    pass", SandboxConfig(timeout_s=1))
    assert result.status == "timeout" and not result.passed and 1 <= result.wall_s < 4


def test_cpu_file_size_and_disk_limits():
    spin = run_program("while True:\n    pass", SandboxConfig(timeout_s=20, cpu_s=1))
    assert spin.status == "killed" and spin.returncode == -9  # pid 1 ignores SIGXCPU: the hard limit kills
    big = run_program("open('big', 'wb').write(b'x' * (2 << 20))", SandboxConfig(timeout_s=3, fsize_mb=1))
    assert big.status == "failed" and "File too large" in big.stderr
    fill = "for i in range(8):\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))"
    full = run_program(fill, SandboxConfig(timeout_s=3, disk_mb=4))  # the writable dir is a 4 MB tmpfs
    assert full.status == "failed" and "No space left on device" in full.stderr


def test_limits_are_validated():
    with pytest.raises(LmforgeError, match="sandbox.nproc"):
        run_program("pass", SandboxConfig(nproc=0))

"""Run an untrusted Python program in its own process, temp dir and Linux namespaces: no network, the filesystem
read-only outside the temp dir, limits on CPU, memory, processes, file size, disk and wall-clock time.

How (kernel 6.18, checked as root and as an unprivileged user): a bootstrap interpreter unshares mount, net and pid
namespaces, makes every mount read-only (`mount_setattr`, Linux >= 5.12), mounts a small tmpfs on the temp dir, and
forks the program as pid 1 of the new pid namespace: when it exits, or the wall clock kills it, the kernel kills all
it started. The program runs as a non-root uid (root is exempt from RLIMIT_NPROC and file modes, so root's programs
run as nobody) with no capability to undo the mounts, and PR_SET_NO_NEW_PRIVS disarms setuid binaries.
Isolations, tried in this order: "user" adds a user namespace, so any user can do it and RLIMIT_NPROC counts this
sandbox's processes only; "root", for root where user namespaces are off, makes the namespaces as root before
dropping to nobody (RLIMIT_NPROC then counts all of nobody's processes). If neither works, the result's status is
"error" and its message names the sysctl to set.
"""

import functools
import inspect
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from lmforge.config import check
from lmforge.errors import LmforgeError

NOBODY = 65534
STATUSES = ("passed", "failed", "timeout", "killed", "error")
ISOLATIONS = ("auto", "user", "root")


@dataclass
class SandboxConfig:
    timeout_s: float = 10.0
    """Wall-clock limit, after which the program and all it started are killed."""
    cpu_s: int = 10
    """CPU seconds (RLIMIT_CPU): the program is killed when it has used them."""
    memory_mb: int = 1024
    """Address space (RLIMIT_AS): allocations beyond it raise MemoryError."""
    nproc: int = 32
    """Processes and threads of the sandbox's uid (RLIMIT_NPROC)."""
    fsize_mb: int = 16
    """Largest file the program may write, stdout and stderr included (RLIMIT_FSIZE)."""
    disk_mb: int = 64
    """Size of the program's writable dir, a tmpfs in memory."""
    tail_chars: int = 4000
    """How much of the end of stdout and stderr the result keeps."""
    isolation: str = "auto"
    """One of ISOLATIONS: "user" (user+mount+net+pid namespaces), "root" (mount+net+pid made by root), "auto" (the
    first of these that works here)."""

    def validate(self) -> None:
        check(self.timeout_s > 0, f"sandbox.timeout_s must be > 0, got {self.timeout_s}")
        for name in ("cpu_s", "memory_mb", "nproc", "fsize_mb", "disk_mb", "tail_chars"):
            check(getattr(self, name) >= 1, f"sandbox.{name} must be >= 1, got {getattr(self, name)}")
        check(self.isolation in ISOLATIONS, f"sandbox.isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        check(self.isolation != "root" or os.geteuid() == 0, "sandbox.isolation=root needs root; use user or auto")


@dataclass
class SandboxResult:
    passed: bool
    status: str
    """One of STATUSES: passed (exit 0), failed (exit != 0), timeout (wall clock), killed (a signal: the CPU limit,
    a crash), error (the sandbox itself could not be set up; the reason is in stderr)."""
    returncode: int | None
    """Exit code, or minus the signal number; None on timeout or error."""
    stdout: str
    stderr: str
    wall_s: float


def _boot(cfg: dict) -> None:
    """Runs in a fresh `python -I -S` between the caller and the program, so it imports only the standard library."""
    import ctypes
    import os
    import resource
    import signal

    libc = ctypes.CDLL(None, use_errno=True)

    def report(key: str, value: object) -> None:  # one "key value" line to the caller; json costs 40 ms to import
        os.write(cfg["status_fd"], f"{key} {value}\n".encode())

    def ok(ret: int, what: str) -> None:
        if ret != 0:
            report("error", f"{what}: {os.strerror(ctypes.get_errno())}")
            os._exit(125)

    CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x20000, 0x10000000, 0x20000000, 0x40000000
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 16384, 1 << 18
    AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, SYS_mount_setattr = -100, 0x8000, 1, 442

    def drop_root() -> None:  # root ignores RLIMIT_NPROC and file modes: run as nobody (the caller chowned the dir)
        os.setgroups([])
        os.setresgid(cfg["nobody"], cfg["nobody"], cfg["nobody"])
        os.setresuid(cfg["nobody"], cfg["nobody"], cfg["nobody"])

    uid, gid = (cfg["nobody"], cfg["nobody"]) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    if cfg["isolation"] == "user":
        if os.geteuid() == 0:
            drop_root()
            libc.prctl(4, 1)  # PR_SET_DUMPABLE: the uid change made /proc/self root's, and we write uid_map there
        ok(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(user, mount, net, pid)")
        # Map our own uid only: the program execs as that non-zero uid, so execve drops the namespace's capabilities.
        for name, text in (("uid_map", f"{uid} {uid} 1"), ("setgroups", "deny"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    else:
        ok(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(mount, net, pid)")
    home = cfg["dir"].encode()
    with open(cfg["dir"] + "/program.py", "rb") as f:  # before the tmpfs hides it
        source = f.read()
    ok(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")  # nothing leaks to the host
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY, 0, 0, 0)  # struct mount_attr: set, clear, propagation, userns
    ok(libc.syscall(SYS_mount_setattr, AT_FDCWD, b"/", AT_RECURSIVE, attr, 32), "mount_setattr(/, read-only)")
    # The one writable place: a size-limited tmpfs over the temp dir, so the disk cannot fill and it vanishes with us.
    opts = f"size={cfg['disk_mb']}m,mode=0700,uid={uid},gid={gid}".encode()
    ok(libc.mount(b"tmpfs", home, b"tmpfs", MS_NOSUID | MS_NODEV, opts), "mount a tmpfs on the temp dir")
    with open(cfg["dir"] + "/program.py", "wb") as f:
        f.write(source)
    pid = os.fork()
    if pid == 0:  # pid 1 of the new namespace: when it exits, the kernel kills whatever it left behind
        PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, SIGKILL = 1, 38, 9
        try:
            # Our own /proc, from inside the new pid namespace: the host's processes (and their command lines) vanish.
            ok(
                libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY, None),
                "mount /proc",
            )
            if cfg["isolation"] == "root":
                drop_root()  # after the mounts, which need root; nobody keeps no capability to undo them
            libc.prctl(PR_SET_PDEATHSIG, SIGKILL)
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            # soft == hard: pid 1 ignores SIGXCPU at the soft limit, the kernel's SIGKILL at the hard one stops it
            for res, value in cfg["rlimits"].items():
                resource.setrlimit(getattr(resource, res), (value, value))
            os.chdir(cfg["dir"])
            os.set_inheritable(cfg["status_fd"], False)
            os.execve(cfg["python"], [cfg["python"], "-I", "-B", "program.py"], cfg["env"])
        except BaseException as e:
            report("error", f"start {cfg['python']}: {e!r}")
            os._exit(125)
    # The caller's SIGTERM (wall clock) kills pid 1, hence the namespace; we reap it, so no zombie goes to init.
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    _, status = os.waitpid(pid, 0)
    report("wait", status)


_BOOT_SOURCE = inspect.getsource(_boot)


@functools.cache
def sandbox_python() -> str:
    """The interpreter the program runs under: ours, unless we are root and `nobody` cannot reach it (a pyenv under
    /root, mode 0700), then the system's /usr/bin/python3 (standard library only)."""
    if os.geteuid() != 0:
        return sys.executable
    paths = [os.path.realpath(sys.executable), os.path.dirname(os.__file__)]
    if all(_world_readable(p) for p in paths):
        return sys.executable
    if os.path.exists("/usr/bin/python3") and _world_readable("/usr/bin/python3"):
        return "/usr/bin/python3"
    raise LmforgeError(
        f"sandbox: running as root, and user nobody cannot run {sys.executable}; run as a non-root user or install "
        "python3 where every user can read it (/usr/bin/python3)"
    )


def _world_readable(path: str) -> bool:
    """Whether a user in no group of ours can reach `path`: o+x on every directory above it, o+r on it."""
    path = os.path.realpath(path)
    if not os.stat(path).st_mode & 0o004:
        return False
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def _read_until_eof(fd: int, deadline: float) -> bytes | None:
    """All that is written to `fd` until every writer has closed it, or None if `deadline` passes first."""
    data = b""
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data
        data += chunk


def _tail(f, chars: int) -> str:
    f.seek(0)
    return f.read().decode("utf-8", "replace")[-chars:]


_auto: list[str] = []  # the isolation that "auto" found to work in this process


def run_program(source: str, cfg: SandboxConfig | None = None) -> SandboxResult:
    """Run `source` as `python program.py` in a fresh temp dir (also its cwd and HOME) and return how it ended."""
    cfg = cfg or SandboxConfig()
    cfg.validate()
    if cfg.isolation != "auto":
        return _run(source, cfg, cfg.isolation)
    for isolation in _auto or (["user", "root"] if os.geteuid() == 0 else ["user"]):
        result = _run(source, cfg, isolation)
        if not result.stderr.startswith("sandbox: unshare"):
            _auto[:] = [isolation]
            return result
    result.stderr = result.stderr.replace(
        "\n",
        "; enable user namespaces (sysctl user.max_user_namespaces=10000; on "
        "Ubuntu also kernel.apparmor_restrict_unprivileged_userns=0)\n",
        1,
    )
    return result


def _run(source: str, cfg: SandboxConfig, isolation: str) -> SandboxResult:
    mb = 1 << 20
    rlimits = {"RLIMIT_CPU": cfg.cpu_s, "RLIMIT_AS": cfg.memory_mb * mb, "RLIMIT_NPROC": cfg.nproc}
    rlimits |= {"RLIMIT_FSIZE": cfg.fsize_mb * mb, "RLIMIT_CORE": 0, "RLIMIT_NOFILE": 256}
    with (
        tempfile.TemporaryDirectory(prefix="lmforge-sandbox-") as home,
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
    ):
        with open(os.path.join(home, "program.py"), "w") as f:
            f.write(source)
        if os.geteuid() == 0:
            os.chown(home, NOBODY, NOBODY)
        env = {"HOME": home, "TMPDIR": home, "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        status_r, status_w = os.pipe()
        boot = {"dir": home, "python": sandbox_python(), "env": env, "rlimits": rlimits, "status_fd": status_w}
        boot |= {"nobody": NOBODY, "isolation": isolation, "disk_mb": cfg.disk_mb}
        argv = [sys.executable, "-I", "-S", "-B", "-c", f"{_BOOT_SOURCE}\n_boot({boot!r})\n"]
        start = time.perf_counter()
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, pass_fds=(status_w,), start_new_session=True,
            cwd=home, env=env,
        )  # fmt: skip
        os.close(status_w)
        lines = _read_until_eof(status_r, start + cfg.timeout_s)  # Popen.wait(timeout) polls: up to 50 ms late
        os.close(status_r)
        if lines is None:
            proc.terminate()
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:  # the bootstrap is stuck: kill it and pid 1 (PR_SET_PDEATHSIG)
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wall_s = time.perf_counter() - start
        stdout, stderr = _tail(out, cfg.tail_chars), _tail(err, cfg.tail_chars)
    report = dict(line.split(" ", 1) for line in (lines or b"").decode().splitlines())
    if lines is None:
        return SandboxResult(False, "timeout", None, stdout, stderr, wall_s)
    if "wait" not in report:
        why = report.get("error", f"bootstrap exited {proc.returncode}")
        return SandboxResult(False, "error", None, stdout, f"sandbox: {why}\n{stderr}", wall_s)
    returncode = os.waitstatus_to_exitcode(int(report["wait"]))
    status = "passed" if returncode == 0 else "failed" if returncode > 0 else "killed"
    return SandboxResult(status == "passed", status, returncode, stdout, stderr, wall_s)

"""Run a model version in a child process on its own venv; frames cross in shared memory.

Used when a version's requirements lock is not satisfied by the worker's own environment
(workers/environments.py decides and builds the venv). `ModelProcess` is the parent-side proxy:
it has the model's `generate(...)` signature, so the task cannot tell it from an in-process model.

This one file is both sides. The child runs it by path on the venv's interpreter:

    <venv>/bin/python -I -X faulthandler .../workers/model_process.py --version-dir D --entrypoint E --device cuda:0

and imports nothing of dreamq (the venv does not have the project; `-I` keeps this file's
directory, PYTHONPATH and the user site out of sys.path, so `workers/*.py` cannot shadow the
model's own modules either). It needs the standard library and numpy only. Running the worker's
copy of this file, instead of one copied into the cached venv, keeps both ends of the protocol
from one release.

Child lifecycle: start -> put `<version>/code` first on sys.path, import the entrypoint, call
`cls.load(version_dir, torch.device(device))` once -> report ready -> serve generate requests one
at a time until told to exit or its stdin closes (the worker died). It is a session leader (a
Ctrl-C at a terminal reaches the worker, which closes it), and a watchdog thread exits it when
its parent changes, i.e. the worker died while the model was inside a long step.

Protocol: JSON lines. The child's original stdin/stdout are the protocol channel; its fd 1 is
then pointed at stderr, so a print() in model code (or a C library writing to stdout) cannot
corrupt the channel. Parent -> child: {"op": "generate", ...}, {"op": "step", "continue": bool},
{"op": "exit"}. Child -> parent: {"event": "ready" | "load_failed" | "step" | "result" |
"cancelled" | "error", ...}. A step is a round trip: the child sends {"event": "step", "step":
done, "total": n} and waits for the parent's continue/cancel, which is what the model's
`on_step` returns (the task's progress callback is also its cancellation check). With no
`on_step` given, no steps are sent at all.

Shared-memory handoff (POSIX shm, `_posixshmem`, which multiprocessing.shared_memory uses
underneath; the resource tracker is deliberately not involved: on Python < 3.13 it would also
claim blocks a process only attached to, and unlink them under the other side at exit):

* frames: the child creates a block of exactly T*H*W*3 bytes named `dq<child pid>_<random>`,
  copies the model's array into it (the one copy: the model produced it in private memory),
  unmaps it and sends {"event": "result", "shm": name, "shape": [...], "dtype": "|u1"}. From then
  on the block is the parent's: it maps the block, unlinks the name at once, and returns a numpy
  array over its own mapping. No copy; the memory goes back to the kernel when that array is
  garbage collected.
* input_video: the parent creates the block, writes the array (one copy), sends its name; the
  child maps it and hands the model a view; the parent unlinks it when the request ends,
  whatever the outcome.
* Space is reserved with posix_fallocate when the block is created, so a full /dev/shm (Docker's
  default is 64 MiB: run workers with --shm-size or --ipc=host) is a clear error naming the size
  instead of a SIGBUS while writing. A block the child created but never handed over (it crashed
  in between) carries the child's pid in its name and is removed when the parent reaps the child.

Failure modes, as the parent sees them:

* the model raises: `ModelProcessError("<Type>: <message>")` with the child's traceback in the
  log and in `.child_traceback`; the child keeps serving.
* cancel: on_step returned False -> the child's on_step returns False -> the model raises its own
  GenerationCancelled -> `SubprocessGenerationCancelled` (the proxy's `cancelled_exc`).
* the child dies (exit, signal, OOM kill): `ModelProcessCrashed` with the exit status and the tail
  of the child's stderr (faulthandler prints the Python stack of a segfault there). The next
  `generate` starts a fresh child, loading the model again.
* load fails (import error, bad weights): `ModelProcessError` from `start()` with the child's
  traceback; `ModelRuntime.get` raises it, the job fails as a model error.
* the parent is interrupted mid-request (a Celery soft time limit, an exception in on_step):
  after an on_step exception the child is asked to cancel and drained to its answer; anything
  else leaves the channel mid-exchange, so the child is killed and the next call restarts it.
"""

from __future__ import annotations

import argparse
import collections
import errno
import importlib
import json
import logging
import mmap
import os
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable

import numpy as np

try:  # CPython on POSIX; what multiprocessing.shared_memory uses underneath
    import _posixshmem
except ImportError:  # pragma: no cover - Windows
    _posixshmem = None

log = logging.getLogger(__name__)

_SHM_DIR = Path("/dev/shm")  # Linux only; used for sweeping leftovers, never needed for correctness
_STDERR_TAIL_LINES = 60


# --- shared memory, both sides ------------------------------------------------------------------


def _shm_path(name: str) -> str:
    return "/" + name


def shm_create(size: int, prefix: str) -> tuple[str, mmap.mmap]:
    """A new POSIX shared-memory block of `size` bytes (space reserved now) and a mapping of it."""
    if _posixshmem is None:
        raise RuntimeError("POSIX shared memory is not available on this platform")
    for _ in range(16):
        # Short names: macOS allows 31 characters.
        name = f"{prefix}{secrets.token_hex(4)}"
        try:
            fd = _posixshmem.shm_open(_shm_path(name), os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        except FileExistsError:
            continue
        break
    else:
        raise RuntimeError("could not find a free shared-memory name")
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except AttributeError:  # macOS
            os.ftruncate(fd, size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OSError(
                    exc.errno,
                    f"no room in shared memory for {size / 2**20:.1f} MiB (give the worker a larger /dev/shm: "
                    "docker --shm-size or --ipc=host)",
                ) from None
            os.ftruncate(fd, size)  # a filesystem without fallocate: reserve lazily
        mapping = mmap.mmap(fd, size)
    except BaseException:
        _posixshmem.shm_unlink(_shm_path(name))
        raise
    finally:
        os.close(fd)  # the mapping holds its own reference
    return name, mapping


def shm_attach(name: str) -> mmap.mmap:
    fd = _posixshmem.shm_open(_shm_path(name), os.O_RDWR, mode=0o600)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def shm_unlink(name: str) -> None:
    try:
        _posixshmem.shm_unlink(_shm_path(name))
    except FileNotFoundError:
        pass


def _close_mapping(mapping: mmap.mmap | None) -> None:
    if mapping is None:
        return
    try:
        mapping.close()
    except BufferError:  # something still holds a view (the model kept the input); GC unmaps it
        pass


def _array_over(mapping: mmap.mmap, shape: list[int], dtype: str) -> np.ndarray:
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return np.frombuffer(mapping, dtype=dt, count=count).reshape(shape)


# --- child side ---------------------------------------------------------------------------------


def _child_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="model_process")
    parser.add_argument("--version-dir", required=True)
    parser.add_argument("--entrypoint", required=True)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    # The protocol keeps the original stdin/stdout; fd 0 becomes /dev/null and fd 1 stderr.
    channel_in = os.fdopen(os.dup(0), "rb")
    channel_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    parent = os.getppid()

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()

    def send(message: dict[str, Any]) -> None:
        channel_out.write(json.dumps(message).encode() + b"\n")
        channel_out.flush()

    version_dir = Path(args.version_dir)
    started = time.perf_counter()
    try:
        sys.path.insert(0, str(version_dir / "code"))
        module_path, _, attr = args.entrypoint.partition(":")
        module = importlib.import_module(module_path)
        cls = getattr(module, attr)
        try:
            import torch

            device: Any = torch.device(args.device)
        except ImportError:  # a model without torch gets the device string
            device = args.device
        model = cls.load(version_dir, device)
        package = sys.modules[module_path.split(".")[0]]
        cancelled = getattr(package, "GenerationCancelled", None) or getattr(module, "GenerationCancelled", None)
    except BaseException as exc:
        send({"event": "load_failed", "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()})
        return 1
    send(
        {
            "event": "ready",
            "pid": os.getpid(),
            "load_s": time.perf_counter() - started,
            "python": sys.executable,
            "prefix": sys.prefix,
        }
    )

    while True:
        line = channel_in.readline()
        if not line:
            return 0  # the parent closed the channel or died
        request = json.loads(line)
        if request.get("op") == "exit":
            return 0
        if request.get("op") == "generate":
            if not _serve_generate(model, cancelled, request, channel_in, send):
                return 0


def _serve_generate(
    model: Any, cancelled: type | None, request: dict[str, Any], channel_in: Any, send: Callable[[dict[str, Any]], None]
) -> bool:
    """Run one request; False when the parent is gone and the child should exit."""
    parent_alive = True
    input_map = None
    input_video = None
    if request.get("input"):
        spec = request["input"]
        input_map = shm_attach(spec["shm"])
        input_video = _array_over(input_map, spec["shape"], spec["dtype"])

    cancel_requested = False

    def on_step(done: int, total: int) -> bool:
        nonlocal parent_alive, cancel_requested
        send({"event": "step", "step": int(done), "total": int(total)})
        reply = channel_in.readline()
        if not reply:
            parent_alive = False  # nobody to deliver to: stop at this step boundary
            return False
        keep_going = bool(json.loads(reply).get("continue"))
        cancel_requested = cancel_requested or not keep_going
        return keep_going

    try:
        try:
            frames = model.generate(
                request["prompt"],
                width=request["width"],
                height=request["height"],
                num_frames=request["num_frames"],
                seed=request["seed"],
                input_video=input_video,
                on_step=on_step if request.get("progress") else None,
            )
        except BaseException as exc:
            if not parent_alive:
                return False
            # Whatever the model raises once told to stop is its way of stopping (a package without
            # a GenerationCancelled class raises something else).
            if (cancelled is not None and isinstance(exc, cancelled)) or (
                cancel_requested and isinstance(exc, Exception)
            ):
                send({"event": "cancelled"})
            elif isinstance(exc, Exception):
                send(
                    {
                        "event": "error",
                        "type": type(exc).__name__,
                        "error": str(exc),
                        "traceback": traceback.format_exc(),
                    }
                )
            else:
                raise
            return True
        finally:
            input_video = None
            _close_mapping(input_map)
        if not parent_alive:
            return False
        array = np.ascontiguousarray(frames)
        if array.dtype.hasobject:
            send(
                {
                    "event": "error",
                    "type": "TypeError",
                    "error": f"generate returned an array of {array.dtype}",
                    "traceback": "",
                }
            )
            return True
        if array.nbytes == 0:
            send({"event": "result", "shm": None, "shape": list(array.shape), "dtype": array.dtype.str})
            return True
        try:
            name, mapping = shm_create(array.nbytes, f"dq{os.getpid()}_")
        except OSError as exc:
            send({"event": "error", "type": "OSError", "error": str(exc), "traceback": ""})
            return True
        view = _array_over(mapping, list(array.shape), array.dtype.str)
        view[...] = array
        del view
        mapping.close()
        try:
            send({"event": "result", "shm": name, "shape": list(array.shape), "dtype": array.dtype.str})
        except BaseException:
            shm_unlink(name)  # never handed over: still ours
            raise
        return True
    except BrokenPipeError:
        return False


# --- parent side --------------------------------------------------------------------------------


class ModelProcessError(RuntimeError):
    """The model failed in its process (load or generate); the message names the child's error."""

    def __init__(self, message: str, child_traceback: str = ""):
        super().__init__(message)
        self.child_traceback = child_traceback


class ModelProcessCrashed(ModelProcessError):
    """The model's process died; the message carries its exit status and stderr tail."""


class SubprocessGenerationCancelled(Exception):
    """on_step asked to stop and the model in the child stopped at a step boundary."""


class _ChannelClosed(Exception):
    pass


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is unresponsive"
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _reap(proc: subprocess.Popen, timeout_s: float = 5.0) -> None:
    """Stop a child: exit politely when it is idle, terminate, then kill."""
    if proc.poll() is None:
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                proc.stdin.close()  # EOF on its channel: an idle child exits by itself
        except OSError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    for stream in (proc.stdin, proc.stdout):
        try:
            if stream is not None:
                stream.close()
        except OSError:
            pass
    _sweep_blocks(proc.pid)


def _sweep_blocks(pid: int) -> None:
    """Remove result blocks a dead child created but never handed over (Linux: /dev/shm)."""
    if not _SHM_DIR.is_dir():
        return
    for path in _SHM_DIR.glob(f"dq{pid}_*"):
        shm_unlink(path.name)


class ModelProcess:
    """Parent-side proxy of a model running in a child process (see the module docstring)."""

    cancelled_exc = SubprocessGenerationCancelled

    def __init__(
        self,
        *,
        python: Path | str,
        version_dir: Path | str,
        entrypoint: str,
        device: str = "cpu",
        label: str = "model",
        start_timeout_s: float = 1800.0,
        env: dict[str, str] | None = None,
    ):
        self.python = str(python)
        self.version_dir = Path(version_dir).resolve()  # the child runs with it as its cwd
        self.entrypoint = entrypoint
        self.device = device
        self.label = label
        self.start_timeout_s = start_timeout_s
        self._env = env
        self._proc: subprocess.Popen | None = None
        self._buffer = bytearray()
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None
        self._lock = threading.Lock()
        self._close_requested = False
        self.starts = 0
        self.load_s = 0.0  # the child's own import + load time, last start
        self.start_s = 0.0  # spawn to ready, last start
        self.child_info: dict[str, Any] = {}

    # -- lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def start(self) -> None:
        """Start the child and wait until the model has loaded (no-op when it is running)."""
        with self._lock:
            self._start_locked()

    def _start_locked(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        if self._proc is not None:
            self._discard()
        self._close_requested = False
        began = time.perf_counter()
        command = [
            self.python,
            "-I",
            "-X",
            "faulthandler",
            str(Path(__file__).resolve()),
            "--version-dir",
            str(self.version_dir),
            "--entrypoint",
            self.entrypoint,
            "--device",
            self.device,
        ]
        env = dict(os.environ if self._env is None else self._env)
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(self.version_dir),
            env=env,
            start_new_session=True,
            bufsize=0,
        )
        self._proc = proc
        self._buffer = bytearray()
        self._stderr = collections.deque(maxlen=_STDERR_TAIL_LINES)
        self._stderr_thread = threading.Thread(
            target=_pump_stderr,
            args=(proc.stderr, self._stderr, self.label, proc.pid),
            name=f"model-stderr-{proc.pid}",
            daemon=True,
        )
        self._stderr_thread.start()
        # Children die with the proxy, or at interpreter exit at the latest.
        self._finalizer = weakref.finalize(self, _reap, proc)
        self.starts += 1
        try:
            message = self._receive(timeout_s=self.start_timeout_s)
        except _ChannelClosed:
            raise self._crashed("while loading") from None
        except TimeoutError:
            self._kill()
            raise ModelProcessError(
                f"{self.label}: the model process did not load within {self.start_timeout_s:.0f} s"
            ) from None
        except BaseException:
            # Interrupted while it loads (a time limit): a half-started child must not count as ready.
            self._kill()
            raise
        if message.get("event") == "load_failed":
            self._discard()
            raise ModelProcessError(
                f"{self.label} failed to load in its process: {message.get('error')}", message.get("traceback", "")
            )
        if message.get("event") != "ready":
            self._discard()
            raise ModelProcessError(f"{self.label}: unexpected first message from the model process: {message!r}")
        self.child_info = message
        self.load_s = float(message.get("load_s", 0.0))
        self.start_s = time.perf_counter() - began
        log.info(
            "model process ready",
            extra={
                "model": self.label,
                "pid": proc.pid,
                "start_s": round(self.start_s, 3),
                "load_s": round(self.load_s, 3),
                "python": message.get("python"),
            },
        )

    def close(self) -> None:
        """Stop the child. During a generate (another thread), it stops when that call returns."""
        if not self._lock.acquire(blocking=False):
            self._close_requested = True
            return
        try:
            self._discard()
        finally:
            self._lock.release()

    def _discard(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _reap once
            self._finalizer = None
        if self._stderr_thread is not None:
            self._stderr_thread.join(timeout=2.0)
            self._stderr_thread = None
        self._proc = None

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._discard()

    def _crashed(self, during: str) -> ModelProcessCrashed:
        proc = self._proc
        assert proc is not None
        try:
            code = proc.wait(timeout=5.0)
        except subprocess.TimeoutExpired:  # the channel broke but the process lingers: end it
            proc.kill()
            code = proc.wait()
        pid = proc.pid
        self._discard()  # joins the stderr pump, so the tail is complete
        tail = "\n".join(self._stderr).strip()
        message = f"{self.label}: the model process (pid {pid}) {_describe_exit(code)} {during}"
        message += f"; its stderr ends with:\n{tail}" if tail else "; it wrote nothing to stderr"
        log.error("model process died", extra={"model": self.label, "pid": pid, "exit": code})
        return ModelProcessCrashed(message)

    # -- the channel

    def _send(self, message: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        data = memoryview(json.dumps(message).encode() + b"\n")
        try:
            while data:  # unbuffered pipe: a write interrupted by a signal may be partial
                written = self._proc.stdin.write(data)
                data = data[written or 0 :]
        except (BrokenPipeError, ValueError, OSError):
            raise _ChannelClosed() from None

    def _receive(self, timeout_s: float | None = None) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while b"\n" not in self._buffer:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                    raise TimeoutError()
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                raise _ChannelClosed()
            self._buffer += chunk
        line, _, rest = bytes(self._buffer).partition(b"\n")
        self._buffer = bytearray(rest)
        try:
            return json.loads(line)
        except ValueError:
            raise _ChannelClosed() from None

    # -- the model's interface

    def generate(
        self,
        prompt: str,
        *,
        width: int,
        height: int,
        num_frames: int,
        seed: int,
        input_video: np.ndarray | None = None,
        on_step: Callable[[int, int], bool] | None = None,
    ) -> np.ndarray:
        with self._lock:
            try:
                self._start_locked()  # a crashed or closed child is restarted here
                return self._generate_locked(prompt, width, height, num_frames, seed, input_video, on_step)
            finally:
                if self._close_requested:
                    self._discard()

    def _generate_locked(self, prompt, width, height, num_frames, seed, input_video, on_step) -> np.ndarray:
        request: dict[str, Any] = {
            "op": "generate",
            "prompt": prompt,
            "width": int(width),
            "height": int(height),
            "num_frames": int(num_frames),
            "seed": int(seed),
            "progress": on_step is not None,
            "input": None,
        }
        input_name = None
        try:
            if input_video is not None:
                source = np.ascontiguousarray(input_video)
                if source.nbytes:
                    input_name, mapping = shm_create(source.nbytes, f"dq{os.getpid()}i_")
                    try:
                        _array_over(mapping, list(source.shape), source.dtype.str)[...] = source
                    finally:
                        _close_mapping(mapping)
                    request["input"] = {"shm": input_name, "shape": list(source.shape), "dtype": source.dtype.str}
            return self._exchange(request, on_step)
        finally:
            if input_name is not None:
                shm_unlink(input_name)

    def _exchange(self, request: dict[str, Any], on_step) -> np.ndarray:
        callback_error: BaseException | None = None
        try:
            self._send(request)
            while True:
                message = self._receive()
                event = message.get("event")
                if event == "step":
                    keep_going = False
                    if callback_error is None:
                        try:
                            keep_going = on_step(message["step"], message["total"]) is not False
                        except Exception as exc:
                            # Stop the model at this boundary, drain to its answer, then re-raise:
                            # the child stays usable, no reload.
                            callback_error = exc
                    self._send({"op": "step", "continue": keep_going})
                elif event == "result":
                    frames = self._take_result(message)
                    if callback_error is not None:
                        raise callback_error
                    return frames
                elif event == "cancelled":
                    if callback_error is not None:
                        raise callback_error
                    raise SubprocessGenerationCancelled(f"{self.label}: generation cancelled at a step boundary")
                elif event == "error":
                    if callback_error is not None:
                        raise callback_error
                    log.warning(
                        "model raised in its process",
                        extra={"model": self.label, "traceback": message.get("traceback")},
                    )
                    raise ModelProcessError(
                        f"{message.get('type')}: {message.get('error')}", message.get("traceback", "")
                    )
                else:
                    raise _ChannelClosed()
        except _ChannelClosed:
            raise self._crashed("while generating") from None
        except (SubprocessGenerationCancelled, ModelProcessError):
            raise
        except BaseException:
            if callback_error is not None and sys.exc_info()[1] is callback_error:
                raise
            # Interrupted mid-exchange (a time limit, KeyboardInterrupt): the channel is in an
            # unknown state, so the child goes and the next call starts a fresh one.
            self._kill()
            raise

    def _take_result(self, message: dict[str, Any]) -> np.ndarray:
        shape, dtype = list(message["shape"]), message["dtype"]
        if message.get("shm") is None:
            return np.zeros(shape, dtype=np.dtype(dtype))
        name = message["shm"]
        try:
            mapping = shm_attach(name)
        finally:
            shm_unlink(name)  # the mapping keeps the memory; the name is not needed any more
        # The array keeps `mapping` alive; the pages go back to the kernel with the array.
        return _array_over(mapping, shape, dtype)


def _pump_stderr(stream: Any, tail: collections.deque, label: str, pid: int) -> None:
    """Keep the child's stderr tail for crash reports and log it line by line."""
    child_log = logging.getLogger(__name__ + ".child")
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            child_log.info(line, extra={"model": label, "pid": pid})
    except (OSError, ValueError):
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))

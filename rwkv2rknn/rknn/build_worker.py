"""A kept build child: several fp16 builds, one after the other, in one process.

::

    parent: Worker().run(args) --one JSON line--> python -m rwkv2rknn.rknn.build_worker
                               <--{"rc": 0, "err": "", "rss": ...}--  (build_child's own _main, per
                                                                      request in a fresh folder)

Every build child imports rknn-toolkit2 and with it torch: about 1.4 s of CPU before the toolkit
does anything, a sixth of a 1024-wide layer's build (bench/build_profile.py). A worker pays it
once. Each request still runs in its own empty folder (its cwd, ``$TMPDIR`` and ``tempfile``'s
folder: the toolkit writes fixed-name scratch files there) with the toolkit's log in the file
the parent names, and the child's reply comes on a channel of its own (the toolkit prints).
If the toolkit kills the process, that build fails as a one-shot child's would, with the
toolkit's last error line, and the next build gets a new worker. A worker whose resident memory
after a build is above ``RETIRE_RSS`` is ended (the allocator keeps what a big build used).
"""

from __future__ import annotations

import contextlib
import io as _io
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Optional, Tuple

from rwkv2rknn.fileio import cache_root, end_kept_child, remove_quietly, scratch_prefix
from rwkv2rknn.rknn.build_child import build_child, child_env, partial_name

RETIRE_RSS = 1 << 30


class Worker:
    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix=scratch_prefix("worker"))
        try:
            self.stderr = open(os.path.join(self.folder, "stderr.txt"), "w+")
            env = child_env(TMPDIR=self.folder, TMP=self.folder, TEMP=self.folder)
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "rwkv2rknn.rknn.build_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self.stderr,
                text=True,
                cwd=self.folder,
                env=env,
            )
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.rss = 0

    @property
    def usable(self) -> bool:
        return self.proc.poll() is None and self.rss <= RETIRE_RSS

    def run(self, argv, rknn_path: str, timeout: float, running=None) -> Tuple[Optional[int], str]:
        """One build (``build_child``'s arguments): (return code, error text); a process that
        died gives its negative signal or exit code; (None, why) past the time limit."""
        tmp = partial_name(os.path.abspath(rknn_path), self.proc.pid)
        said_before = os.path.getsize(self.stderr.name)  # what this build's child says starts here
        if running is not None:
            running.add(self.proc)
        try:
            self.proc.stdin.write(json.dumps({"argv": list(argv)}) + "\n")
            self.proc.stdin.flush()
            ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
            if not ready:
                self.close()
                return None, f"build took longer than {timeout:g} s"
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        except BaseException:  # Ctrl-C: leave no child and no partial file
            self.close()
            raise
        finally:
            if running is not None:
                running.discard(self.proc)
            remove_quietly(tmp)
        if not line:  # the toolkit ended the process
            code = self.proc.wait()
            return code, self._stderr_tail(said_before)
        reply = json.loads(line)
        self.rss = int(reply.get("rss", 0))
        return int(reply["rc"]), reply.get("err", "")

    def _stderr_tail(self, start: int) -> str:
        try:
            self.stderr.seek(start)
            return self.stderr.read()[-4000:]
        except (OSError, ValueError):
            return ""

    def close(self) -> None:
        end_kept_child(self.proc, self.stderr, self.folder)


class CachedBuilds:
    """fp16 builds through the checked, locked cache; the children that run, to stop them."""

    def __init__(self, options, version: str):
        from rwkv2rknn.rknn.buildcache import BuildCache

        self.opts, self.version = options, version
        self.cache = BuildCache(os.path.join(cache_root(self.opts.cache_dir), "rknn"))
        self.running: set = set()
        self.stopping = False
        self.local, self.workers = threading.local(), []  # kept build children, one per thread

    def worker(self):
        """This thread's kept build child (a new one if it has none or it may not go on)."""
        if self.opts.verbose:
            return None  # the toolkit's output goes to the terminal: one child per build
        w = getattr(self.local, "worker", None)
        if w is None or not w.usable:
            if w is not None:
                w.close()
            w = self.local.worker = Worker()
            self.workers.append(w)
        return w

    def drop_worker(self) -> None:
        """End this thread's kept child (it would hold its memory while the thread waits)."""
        w = getattr(self.local, "worker", None)
        if w is not None:
            self.local.worker = None
            w.close()

    def close(self) -> None:
        for w in self.workers:
            w.close()

    def fetch_or_build(self, onnx_path: str, key: str, dest: str, rows=()):
        """(status, reason): status 'cached' / 'built' / 'rebuilt (...)', or '' and why not."""
        cache = self.cache
        with cache.locked(key, lambda: self.stopping):
            digest, problem = cache.copy_to(key, dest)
            if digest:
                return "cached", ""
            reason = build_child(
                onnx_path,
                cache.entry(key),
                self.opts.target,
                self.opts.verbose,
                self.opts.build_timeout,
                rows,
                running=self.running,
                checksum=cache.sum_path(key),
                worker=self.worker(),
            )
            if reason:
                return "", reason
            if not cache.copy_to(key, dest)[0]:
                return "", "the built entry changed in the cache before it was copied"
            return (f"rebuilt (the cache entry had {problem})" if problem else "built"), ""

    def stop(self) -> None:
        self.stopping = True
        for proc in list(self.running) + [w.proc for w in self.workers]:
            try:
                proc.kill()
            except OSError:
                pass


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _serve() -> int:
    from rwkv2rknn.rknn.build_child import _main
    from rwkv2rknn.compiler.resources import give_back_memory
    from rwkv2rknn.rknn.toolkit import import_toolkit

    import_toolkit()  # once, before the first request
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the toolkit prints never reaches the reply channel
    base = os.getcwd()
    for line in sys.stdin:
        argv = json.loads(line)["argv"]
        folder = tempfile.mkdtemp(prefix="build-", dir=base)
        err = _io.StringIO()
        try:
            os.chdir(folder)
            os.environ.update(TMPDIR=folder, TMP=folder, TEMP=folder)
            tempfile.tempdir = folder
            with contextlib.redirect_stderr(err):
                rc = _main(argv)
        except Exception:  # noqa: BLE001 - what a one-shot child would die of: its last line
            rc = 1
            err.write(traceback.format_exc())
        finally:
            os.chdir(base)
            tempfile.tempdir = base
            shutil.rmtree(folder, ignore_errors=True)
        give_back_memory()
        reply.write(json.dumps({"rc": rc, "err": err.getvalue()[-4000:], "rss": _rss()}) + "\n")
        reply.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_serve())

"""The rwkv2rknn command line: the click group, one-line errors and exit codes.

Only this package prints and chooses exit codes: 0 done, 1 a failed job, 2 bad usage. The
commands (``compiling.py``, ``running.py``, ``measuring.py``, ``board.py``) only parse options, call the
library and print what it returns.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import sys
from typing import Optional

import click

from rwkv2rknn import __version__
from rwkv2rknn.errors import Rwkv2RknnError, UsageError


class _Ctx:
    debug = False


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt, so that a terminated
    command cleans up as an interrupted one does (build children stopped, temporary folders and
    partial files removed, the previous output kept); exit 143."""


HELD = {signal.SIGINT, signal.SIGTERM}  # signals held over compile's restart on huge pages


def _terminate(signum, frame) -> None:
    raise Terminated()


def _interrupted(e: BaseException) -> None:
    """Ctrl-C: 'interrupted', exit 130; SIGTERM: 'terminated', exit 143 (``main`` leaves through
    ``_exit_now``). The work below has cleaned up by now; a second Ctrl-C or SIGTERM while the
    exit handlers run is ignored, so it cannot cut them short."""
    for sig in HELD:
        signal.signal(sig, signal.SIG_IGN)
    if isinstance(e, Terminated) or isinstance(e.__cause__, Terminated):
        click.echo("terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    click.echo("interrupted", err=True)
    sys.exit(130)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )


def _from_interrupt(e: BaseException) -> Optional[BaseException]:
    """The Ctrl-C or SIGTERM behind ``e``, if any: an import that a signal cut short fails as
    ImportError ("initialization failed") with the KeyboardInterrupt as its context."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def handle_errors(fn):
    """Turn library errors into one line on stderr and an exit code (a traceback with --debug)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Rwkv2RknnError as e:
            if _Ctx.debug:
                raise
            click.echo(f"error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt as e:
            _interrupted(e)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except OSError as e:  # a full disk, a folder not writable, ...: the system's own words
            if (cut := _from_interrupt(e)) is not None:
                _interrupted(cut)
            if _Ctx.debug:
                raise
            where = f" ({e.filename})" if e.filename else ""
            fix = (
                "free some space or write elsewhere"
                if e.errno == errno.ENOSPC
                else "check the path and its permissions"
            )
            click.echo(f"error: {e.strerror or type(e).__name__}{where}: {fix}", err=True)
            sys.exit(1)
        except Exception as e:  # noqa: BLE001 - the last line of defence, still one line
            if (cut := _from_interrupt(e)) is not None:
                _interrupted(cut)
            if _Ctx.debug:
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            click.echo(
                f"error: internal error {type(e).__name__}: {msg} "
                f"(run again with --debug for the traceback and report it)",
                err=True,
            )
            sys.exit(1)

    return wrapper


class _Group(click.Group):
    """Click's own usage errors (a bad flag value, a missing option) as one `error:` line, exit 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `rwkv2rknn`: click shows the help
                e.show()
                sys.exit(e.exit_code)
            where = e.ctx.command_path if e.ctx is not None else (prog_name or "rwkv2rknn")
            msg = " ".join(e.format_message().split()).rstrip(".")
            click.echo(f"error: {msg}; see '{where} --help'", err=True)
            sys.exit(2)
        except click.Abort as e:
            _interrupted(e)
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="rwkv2rknn")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
def cli(debug: bool, verbose: bool) -> None:
    """Compile RWKV language models for the Rockchip RK3588 NPU and run them.

    \b
    Typical flow:
      rwkv2rknn export model.pth -o model/        # checkpoint -> per-layer ONNX
      rwkv2rknn compile model/ -o model.rknn.d/   # ONNX -> hybrid NPU/CPU artifact
      rwkv2rknn run model.rknn.d/ --prompt "Hi"   # generate text
      rwkv2rknn check model.rknn.d/               # hybrid vs pure ONNX Runtime
    """
    _Ctx.debug = debug
    _setup_logging(verbose)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)  # held over a restart (main)


def say(message: str) -> None:
    """Progress and notes: to stderr, so stdout holds only the command's result."""
    click.echo(message, err=True)


def model_path(artifact):
    """ARTIFACT, or with none given the bundled model (exported and compiled on first use into the
    user's cache: the compile side does that; the runtime opens only what it is given)."""
    if artifact is None:
        from rwkv2rknn.compiler.bundled import ensure_compiled

        artifact = ensure_compiled(echo=say)
    return artifact


def check_out_file(path, flag: str) -> None:
    """Refuse an output file whose folder is missing or not writable before any work is done."""
    if not path:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UsageError(
            f"cannot write {flag} '{path}': folder '{folder}' does not exist or is not writable",
            "give a path in an existing, writable folder",
        )


def main() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    signal.signal(signal.SIGTERM, _terminate)
    if "compile" in sys.argv[1:4] and sys.platform.startswith("linux"):
        try:
            _start_on_huge_pages()
        except (KeyboardInterrupt, Terminated) as e:
            _interrupted(e)
    try:
        try:
            cli(prog_name="rwkv2rknn")
        except KeyboardInterrupt as e:  # one that came outside a command (click's own code, an import)
            _interrupted(e)
    except SystemExit as e:
        if e.code in (130, 128 + signal.SIGTERM):
            _exit_now(e.code)
        raise


def _exit_now(code: int) -> None:
    """Exit with ``code`` after an interrupt, the cleaning up done. Not through the interpreter's
    own end: under ``python -m``, CPython ends a process by SIGINT, whatever its exit code, when
    a Ctrl-C ever reached code that a C extension evaluated from a string (pybind11 modules do,
    as they are imported), even if it was caught (CPython's ``unhandled_keyboard_interrupt``).
    The exit handlers run first; threads still running end with the process."""
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _start_on_huge_pages() -> None:
    """Start the process again with its heap on huge pages, which glibc's allocator reads only
    when a process starts (a compile's heap on huge pages takes a quarter less CPU;
    ``resources.HUGE_PAGES``); nothing if it is so already or cannot be."""
    from rwkv2rknn.compiler.resources import huge_page_env

    env = huge_page_env(dict(os.environ))
    if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES") and sys.executable:
        # Ctrl-C and SIGTERM wait (the mask and a pending signal pass the exec) until the
        # command is there to take them (``cli`` unblocks them): exit 130 or 143, as ever
        signal.pthread_sigmask(signal.SIG_BLOCK, HELD)
        try:
            os.execve(sys.executable, [sys.executable, "-m", "rwkv2rknn", *sys.argv[1:]], env)
        except OSError:  # then without
            signal.pthread_sigmask(signal.SIG_UNBLOCK, HELD)

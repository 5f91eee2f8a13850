"""`rwkv2rknn chat` (a conversation in the terminal) and `rwkv2rknn serve` (an OpenAI-compatible
HTTP API): both on one session (``runtime.session``), as `run` is."""

from __future__ import annotations

import os
import signal
import sys

import click

from rwkv2rknn.cli.app import cli, handle_errors, model_path, say
from rwkv2rknn.cli.options import (
    FILE,
    FOLDER,
    artifact_argument,
    backend_option,
    core_mask_option,
    option,
    options,
    seed_option,
    temperature_option,
    tokenizer_option,
)
from rwkv2rknn.errors import Rwkv2RknnError, UsageError
from rwkv2rknn.runtime.sampler import CHAT_DEFAULTS

HELP = (
    "commands: /reset (forget the conversation), /save FILE, /load FILE, /quit (or Ctrl-D); "
    "Ctrl-C stops a reply"
)


# the sampler flags: flag, type, the SamplerArgs field it sets (and takes its default from), help
SAMPLER_FLAGS = (
    (
        "--top-p",
        click.FloatRange(0, 1),
        "top_p",
        "Nucleus sampling: keep the most likely tokens up to this mass.",
    ),
    ("--top-k", click.IntRange(0, None), "top_k", "Keep at most this many tokens (0: no limit)."),
    (
        "--presence-penalty",
        click.FloatRange(-10, 10),
        "alpha_presence",
        "alpha_presence: subtracted from every token seen in the reply.",
    ),
    (
        "--frequency-penalty",
        click.FloatRange(-10, 10),
        "alpha_frequency",
        "alpha_frequency: subtracted per (decayed) occurrence.",
    ),
    (
        "--penalty-decay",
        click.FloatRange(0, 1),
        "alpha_decay",
        "alpha_decay: occurrences shrink by this factor per token.",
    ),
)


def sampler_options(fn, d=CHAT_DEFAULTS):
    """The sampler flags, with the `rwkv` package's names in the help; each passes its value
    as the SamplerArgs field it sets."""
    flags = [
        option(flag, field, type=t, default=getattr(d, field), help=h) for flag, t, field, h in SAMPLER_FLAGS
    ]
    temperature = temperature_option(d.temperature)  # as `run` has it
    return options(temperature, *flags, seed_option(help="Random seed for sampling."))(fn)


model_options = options(
    artifact_argument(required=False),
    backend_option("Where NPU segments run (CPU segments always use onnxruntime)."),
    core_mask_option("Board backends only: NPU cores (0, 1, 2, 0_1, 0_1_2, auto)."),
    tokenizer_option(),
)


@cli.command()
@model_options
@click.option("--system", help="A system prompt, fed once at the start (kept by /reset).")
@option("--max-tokens", type=click.IntRange(1, 65536), default=500, help="Most tokens in one reply.")
@click.option("--load", "load_file", type=FILE, help="Start from a state saved with /save.")
@sampler_options
@handle_errors
def chat(artifact, backend, core_mask, tokenizer, system, max_tokens, load_file, seed, **sampler):
    """Chat with ARTIFACT (default: the bundled model) in the terminal.

    \b
    The conversation is RWKV's state: each message prefills only its own
    tokens, however long the conversation. Format: "User: ...\\n\\nAssistant:"
    (RWKV World / G1); a reply ends at a blank line.
    Commands: /reset, /save FILE, /load FILE, /quit. Ctrl-C stops a reply."""
    from rwkv2rknn.runtime.generate import model_tokenizer
    from rwkv2rknn.runtime import chatformat
    from rwkv2rknn.runtime.loader import open_model
    from rwkv2rknn.runtime.sampler import Sampler, SamplerArgs
    from rwkv2rknn.runtime.session import Session

    model, tok_spec = open_model(model_path(artifact), backend, core_mask, echo=say)
    tok = model_tokenizer(tokenizer or tok_spec)
    session = Session(model, tok)
    if system is not None and chatformat.clean(system):
        session.feed(session.encode(chatformat.turn("system", system)))
    start = session.snapshot()
    if load_file:
        session.load(load_file)
        say(f"loaded {len(session.tokens)} tokens of conversation from {load_file}")
    args = SamplerArgs(**sampler, token_ban=tuple(session.end_ids))
    sampler = Sampler(args, seed=seed, tokenizer=tok)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
    say(f"chat with {session.description} ({HELP})")
    while True:
        try:
            line = input("User: ")
        except EOFError:
            click.echo()
            return
        except KeyboardInterrupt:
            click.echo()
            say("(/quit or Ctrl-D leaves the chat)")
            continue
        cmd, _, rest = line.strip().partition(" ")
        if cmd in ("/quit", "/exit"):
            return
        if cmd == "/reset":
            session.restore(start)
            say("the conversation is forgotten")
            continue
        if cmd in ("/save", "/load"):
            _save_or_load(session, cmd, rest.strip())
            continue
        if cmd.startswith("/") and cmd not in ("/",):
            say(f"unknown command {cmd}; {HELP}")
            continue
        if not chatformat.clean(line):
            continue
        _reply(session, sampler, chatformat.user_turn(line), max_tokens)


def _save_or_load(session, cmd: str, path: str) -> None:
    if not path:
        say(f"error: {cmd} needs a file name, like {cmd} chat.state")
        return
    try:
        if cmd == "/save":
            session.save(os.path.expanduser(path))
            say(f"saved {len(session.tokens)} tokens of conversation to {path}")
        else:
            session.load(os.path.expanduser(path))
            say(f"loaded {len(session.tokens)} tokens of conversation from {path}")
    except Rwkv2RknnError as e:
        say(f"error: {e}")
    except OSError as e:
        say(f"error: cannot write '{path}' ({e.strerror}): give a path in a writable folder")


def _reply(session, sampler, text: str, max_tokens: int) -> None:
    """One reply, streamed; Ctrl-C stops it (the chat goes on); the turn is always closed with
    a blank line in the state, so the next message follows a well-formed conversation."""
    from rwkv2rknn.runtime.chatformat import TURN_END

    stop = {"now": False}

    def on_sigint(signum, frame):
        stop["now"] = True

    def out(piece):
        click.echo(piece, nl=False)
        sys.stdout.flush()

    ids = session.encode(text)
    old = signal.signal(signal.SIGINT, on_sigint)
    try:
        click.echo("Assistant:", nl=False)
        sys.stdout.flush()
        reply = session.generate(
            ids, sampler, max_tokens, stop=[TURN_END], stop_ids=(), on_text=out, cancel=lambda: stop["now"]
        )
        if reply.finish_reason != "stop":
            session.feed(session.encode(TURN_END))
    finally:
        signal.signal(signal.SIGINT, old)
    click.echo("\n")
    note = " (stopped)" if reply.finish_reason == "cancelled" else ""
    say(
        f"[{len(reply.ids)} tokens, {reply.decode_tokens_per_s:.1f} tokens/s; prompt "
        f"{reply.prompt_tokens} tokens in {1000 * reply.prefill_s:.0f} ms; "
        f"{len(session.tokens)} in the conversation]{note}"
    )


@cli.command()
@model_options
@option("--host", default="127.0.0.1", help="Address to listen on.")
@option("--port", type=click.IntRange(0, 65535), default=8000)
@click.option("--model-name", help="The model id clients name (default: the artifact folder's name).")
@option(
    "--max-queue",
    type=click.IntRange(0, 100000),
    default=16,
    help="Requests that may wait behind the one running; more get 429.",
)
@option("--max-prompt-tokens", type=click.IntRange(1, None), default=16384, help="Longer prompts get 400.")
@option(
    "--max-tokens",
    "default_max_tokens",
    type=click.IntRange(1, 1 << 20),
    default=1024,
    help="Tokens per reply when a request gives no max_tokens.",
)
@option(
    "--request-timeout",
    type=click.FloatRange(0.1, None),
    default=600.0,
    help="Seconds a request may take, waiting included; a reply is cut there.",
)
@option(
    "--state-cache-mb",
    type=click.FloatRange(0, None),
    default=256.0,
    help="Memory for states kept between requests (0: none).",
)
@click.option("--state-dir", type=FOLDER, help="Keep the state cache in this folder across restarts.")
@handle_errors
def serve(
    artifact,
    backend,
    core_mask,
    tokenizer,
    host,
    port,
    model_name,
    max_queue,
    max_prompt_tokens,
    default_max_tokens,
    request_timeout,
    state_cache_mb,
    state_dir,
):
    """An OpenAI-compatible HTTP API for ARTIFACT (default: the bundled model).

    \b
    GET /v1/models, POST /v1/chat/completions and /v1/completions (stream
    or not), GET /health. Requests run one at a time in arrival order; the
    RWKV state after each is cached, so a request that extends an earlier
    one (the next turn of a chat) prefills only its new tokens."""
    try:
        from rwkv2rknn.runtime.server import ServerConfig, run_server
    except ImportError as e:
        from rwkv2rknn.errors import MissingDependency

        raise MissingDependency(
            f"serve needs {e.name or 'starlette and uvicorn'}", "pip install 'rwkv2rknn[serve]'"
        ) from e
    if state_dir and not os.path.isdir(state_dir):
        try:
            os.makedirs(state_dir, exist_ok=True)
        except OSError as e:
            raise UsageError(
                f"cannot make --state-dir '{state_dir}' ({e.strerror})", "give a writable folder"
            ) from e
    bundled = "rwkv2rknn-bundled" if artifact is None else None  # the model id clients see
    cfg = ServerConfig(
        artifact=model_path(artifact),
        backend=backend,
        core_mask=core_mask,
        tokenizer=tokenizer,
        model_name=model_name or bundled,
        max_queue=max_queue,
        max_prompt_tokens=max_prompt_tokens,
        default_max_tokens=default_max_tokens,
        request_timeout=request_timeout,
        state_cache_bytes=int(state_cache_mb * (1 << 20)),
        state_dir=state_dir,
    )
    run_server(cfg, host, port, echo=say)

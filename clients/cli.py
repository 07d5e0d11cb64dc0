"""`vbctl`: talk to a vbserve server from a shell.

    vbctl generate "Once upon a time" --adapter my-adapter --max-tokens 64
    vbctl chat --adapter my-adapter                  # interactive; or give a message
    vbctl adapters push NAME PATH                    # PATH: adapter blob file or PEFT dir
    vbctl adapters pull NAME -o FILE [--format native|peft|lora] [--omit-bank]
    vbctl adapters ls | rm NAME
    vbctl adapters import-peft NAME DIR              # upload a PEFT VB-LoRA checkpoint
    vbctl adapters export-peft NAME DIR              # download one, unpacked into DIR

The server is `--url`, else $VBCTL_URL, else http://127.0.0.1:8000.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .client import DEFAULT_URL, PEFT_FILES, AdapterInfo, APIError, VBServeClient


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with VBServeClient(args.url) as client:
            args.run(client, args)
    except APIError as exc:
        print(f"vbctl: {exc.type}: {exc}", file=sys.stderr)
        return 1
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"vbctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbctl", description="Client for a vbserve server")
    parser.add_argument("--url", default=os.environ.get("VBCTL_URL", DEFAULT_URL), help="server URL (env VBCTL_URL)")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="complete a prompt (streams the text)")
    generate.add_argument("prompt")
    _sampling_arguments(generate)
    generate.set_defaults(run=_generate)

    chat = commands.add_parser("chat", help="chat with the model; interactive without a message")
    chat.add_argument("message", nargs="?", help="one message to answer; omit for an interactive session")
    chat.add_argument("--system", help="system prompt")
    _sampling_arguments(chat)
    chat.set_defaults(run=_chat)

    adapters = commands.add_parser("adapters", help="manage adapters").add_subparsers(dest="action", required=True)
    push = adapters.add_parser("push", help="upload an adapter blob file or a PEFT checkpoint dir")
    push.add_argument("name")
    push.add_argument("path", type=Path)
    push.set_defaults(run=_push)
    import_peft = adapters.add_parser("import-peft", help="upload a PEFT VB-LoRA checkpoint directory")
    import_peft.add_argument("name")
    import_peft.add_argument("dir", type=Path)
    import_peft.set_defaults(run=_import_peft)
    pull = adapters.add_parser("pull", help="download an adapter")
    pull.add_argument("name")
    pull.add_argument("-o", "--output", type=Path, help="file to write (default: a name derived from NAME)")
    pull.add_argument("--format", choices=["native", "peft", "lora"], default="native")
    pull.add_argument("--omit-bank", action="store_true", help="native only: leave out the vector bank")
    pull.set_defaults(run=_pull)
    export_peft = adapters.add_parser("export-peft", help="download a PEFT VB-LoRA checkpoint into a directory")
    export_peft.add_argument("name")
    export_peft.add_argument("dir", type=Path)
    export_peft.set_defaults(run=_export_peft)
    ls = adapters.add_parser("ls", help="list adapters")
    ls.set_defaults(run=_ls)
    rm = adapters.add_parser("rm", help="delete adapters")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(run=_rm)
    return parser


def _sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", "-a", help="adapter name (default: the base model)")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 for greedy (server default 1.0)")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="stop string (repeatable)")


def _options(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling flags that were given (the server defaults the rest)."""
    names = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop")
    return {n: getattr(args, n) for n in names if getattr(args, n) is not None}


def _generate(client: VBServeClient, args: argparse.Namespace) -> None:
    for delta in client.stream(args.prompt, adapter=args.adapter, **_options(args)):
        print(delta, end="", flush=True)
    print()


def _chat(client: VBServeClient, args: argparse.Namespace) -> None:
    messages = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        reply = []
        for delta in client.chat_stream(messages, adapter=args.adapter, **_options(args)):
            reply.append(delta)
            print(delta, end="", flush=True)
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})

    if args.message is not None:
        answer(args.message)
        return
    interactive = sys.stdin.isatty()
    while True:
        try:
            text = input("> " if interactive else "")
        except EOFError:
            return
        if text.strip():
            answer(text)


def _push(client: VBServeClient, args: argparse.Namespace) -> None:
    _print_pushed(client.adapters.push(args.name, args.path))


def _import_peft(client: VBServeClient, args: argparse.Namespace) -> None:
    if not args.dir.is_dir():
        raise NotADirectoryError(f"{args.dir} is not a directory")
    _print_pushed(client.adapters.push(args.name, args.dir))


def _pull(client: VBServeClient, args: argparse.Namespace) -> None:
    data = client.adapters.pull(args.name, format=args.format, omit_bank=args.omit_bank)
    output = args.output or Path(args.name + (".safetensors" if args.format == "native" else f"-{args.format}.zip"))
    output.write_bytes(data)
    print(f"wrote {output} ({len(data)} bytes)")


def _export_peft(client: VBServeClient, args: argparse.Namespace) -> None:
    data = client.adapters.pull(args.name, format="peft")
    args.dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for name in PEFT_FILES:  # only the two known names: never paths from the archive
            (args.dir / name).write_bytes(zf.read(name))
    print(f"wrote {args.dir / PEFT_FILES[0]} and {args.dir / PEFT_FILES[1]}")


def _ls(client: VBServeClient, args: argparse.Namespace) -> None:
    rows = [("NAME", "VERSION", "RANK", "BYTES", "UPDATED")]
    for a in client.adapters.iter():
        updated = datetime.fromtimestamp(a.updated, UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((a.name, str(a.version), str(a.config.get("r", "")), str(a.stored_bytes), updated))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _rm(client: VBServeClient, args: argparse.Namespace) -> None:
    for name in args.names:
        client.adapters.delete(name)
        print(f"deleted {name}")


def _print_pushed(info: AdapterInfo) -> None:
    print(f"pushed {info.name} version {info.version} ({info.stored_bytes} bytes)")


if __name__ == "__main__":
    sys.exit(main())

"""`vbctl`: talk to a vbserve server from a shell.

    vbctl generate "Once upon a time" --adapter my-adapter --max-tokens 64
    vbctl chat --adapter my-adapter                  # interactive; or give a message
    vbctl adapters push NAME PATH                    # PATH: adapter blob file or PEFT dir
    vbctl adapters pull NAME -o FILE [--format native|peft|lora] [--omit-bank]
    vbctl adapters ls | rm NAME
    vbctl adapters import-peft NAME DIR              # upload a PEFT VB-LoRA or LoRA checkpoint
    vbctl adapters export-peft NAME DIR              # download one, unpacked into DIR
    vbctl train DATA.jsonl --adapter NAME [--validation F] [--steps N] ... [--follow]
    vbctl jobs ls | show ID | cancel ID | events ID [--follow]

The server is `--url`, else $VBCTL_URL, else http://127.0.0.1:8000; the API key is
`--api-key`, else $VBSERVE_API_KEY (a server without authentication needs none).
`train --follow` shows a progress bar with the live loss and exits 1 unless the job
succeeds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import zipfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .client import (
    API_KEY_ENV,
    DEFAULT_URL,
    PEFT_FILES,
    AdapterInfo,
    APIError,
    FineTuningJob,
    JobEvent,
    VBServeClient,
)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with VBServeClient(args.url, api_key=args.api_key) as client:
            return args.run(client, args) or 0
    except APIError as exc:
        print(f"vbctl: {exc.type}: {exc}", file=sys.stderr)
        return 1
    except (OSError, zipfile.BadZipFile) as exc:
        print(f"vbctl: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbctl", description="Client for a vbserve server")
    parser.add_argument("--url", default=os.environ.get("VBCTL_URL", DEFAULT_URL), help="server URL (env VBCTL_URL)")
    parser.add_argument("--api-key", help=f"API key (default: env {API_KEY_ENV})")
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
    import_peft = adapters.add_parser("import-peft", help="upload a PEFT VB-LoRA or LoRA checkpoint directory")
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

    train = commands.add_parser("train", help="start a fine-tuning job on a JSONL file")
    train.add_argument("data", type=Path, help='JSONL: {"prompt", "completion"} or {"messages": [...]} per line')
    train.add_argument("--adapter", "-a", required=True, help="adapter name to publish the result as")
    train.add_argument("--validation", type=Path, help="held-out JSONL file; its loss is reported per epoch")
    for flag, name, kind, text in HYPERPARAMETER_FLAGS:
        train.add_argument(flag, dest=name, type=kind, help=text)
    train.add_argument("--truncate", action="store_true", help="truncate rows over --max-seq-len (default: refuse)")
    train.add_argument("--follow", "-f", action="store_true", help="show progress until the job ends")
    train.set_defaults(run=_train)

    jobs = commands.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="action", required=True)
    jobs.add_parser("ls", help="list jobs, newest first").set_defaults(run=_jobs_ls)
    show = jobs.add_parser("show", help="a job as JSON")
    show.add_argument("id")
    show.set_defaults(run=_jobs_show)
    cancel = jobs.add_parser("cancel", help="cancel a job")
    cancel.add_argument("id")
    cancel.set_defaults(run=_jobs_cancel)
    events = jobs.add_parser("events", help="a job's progress events")
    events.add_argument("id")
    events.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    events.set_defaults(run=_jobs_events)
    return parser


JOBS_LS_LIMIT = 99  # the server's largest page of jobs
# (flag, hyperparameter, type, help) of `vbctl train`; omitted flags take the server's defaults.
HYPERPARAMETER_FLAGS = [
    ("--epochs", "epochs", int, "passes over the data (default: from the data size)"),
    ("--steps", "max_steps", int, "optimizer steps; replaces --epochs"),
    ("--r", "r", int, "LoRA rank"),
    ("--b", "vector_length", int, "bank vector length; must divide every targeted dimension"),
    ("--h", "num_vectors", int, "vectors in the bank"),
    ("--k", "topk", int, "bank vectors mixed per sub-vector"),
    ("--lr-bank", "lr_bank", float, "learning rate of the vector bank (default 1e-2)"),
    ("--lr-logits", "lr_logits", float, "learning rate of the logits (default 1e-1)"),
    ("--batch-size", "batch_size", int, None),
    ("--max-seq-len", "max_seq_len", int, "tokens per row"),
    ("--seed", "seed", int, None),
    ("--modules", "target_modules", lambda text: [m.strip() for m in text.split(",") if m.strip()],
     "comma-separated target modules (default q_proj,v_proj)"),
]  # fmt: skip


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
    _print_table(rows)


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _rm(client: VBServeClient, args: argparse.Namespace) -> None:
    for name in args.names:
        client.adapters.delete(name)
        print(f"deleted {name}")


def _print_pushed(info: AdapterInfo) -> None:
    print(f"pushed {info.name} version {info.version} ({info.stored_bytes} bytes)")


def _train(client: VBServeClient, args: argparse.Namespace) -> int:
    hyperparameters = {name: getattr(args, name) for _, name, _, _ in HYPERPARAMETER_FLAGS}
    hyperparameters = {k: v for k, v in hyperparameters.items() if v is not None}
    if args.truncate:
        hyperparameters["truncation"] = "truncate"
    job = client.jobs.create(args.data, args.adapter, args.validation, **hyperparameters)
    print(f"created {job.id}: training adapter {job.adapter}")
    if not args.follow:
        return 0
    return _exit_code(_follow_with_bar(client, job))


def _follow_with_bar(client: VBServeClient, job: FineTuningJob) -> FineTuningJob:
    """A progress bar over the job's steps with the live loss; the job as it ended."""
    with tqdm(desc=job.adapter, unit="step", dynamic_ncols=True) as bar:
        for update in client.jobs.follow(job.id):
            if isinstance(update, FineTuningJob):
                job = update
                bar.set_description(f"{job.adapter} ({job.status})")
                continue
            if update.step < bar.n or bar.total != update.total_steps:  # the first event, or a re-run
                bar.reset(total=update.total_steps)
            bar.update(update.step - bar.n)
            bar.set_postfix_str(_metrics(update), refresh=True)
    return job


def _exit_code(job: FineTuningJob) -> int:
    """0 when the job published its adapter, else 1 with the reason."""
    if job.status == "succeeded":
        print(f"{job.id} succeeded: adapter {job.fine_tuned_model} version {job.adapter_version}")
        return 0
    print(f"vbctl: {job.id} {job.status}" + (f": {job.error}" if job.error else ""), file=sys.stderr)
    return 1


def _metrics(event: JobEvent) -> str:
    text = f"loss {event.loss:.4f}"
    if event.val_loss is not None:
        text += f", val loss {event.val_loss:.4f}"
    if event.val_exact_match is not None:
        text += f", exact match {event.val_exact_match:.3f}"
    return f"{text}, {event.tokens_per_s:.0f} tok/s"


def _jobs_ls(client: VBServeClient, args: argparse.Namespace) -> None:
    rows = [("ID", "STATUS", "ADAPTER", "STEP", "LOSS", "CREATED")]
    for job in client.jobs.list(limit=JOBS_LS_LIMIT).data:
        step = f"{job.progress.step}/{job.progress.total_steps}" if job.progress.total_steps else "-"
        loss = f"{job.progress.loss:.4f}" if job.progress.loss is not None else "-"
        created = datetime.fromtimestamp(job.created_at, UTC).strftime("%Y-%m-%d %H:%M:%S")
        rows.append((job.id, job.status, job.adapter, step, loss, created))
    _print_table(rows)


def _jobs_show(client: VBServeClient, args: argparse.Namespace) -> None:
    print(json.dumps(asdict(client.jobs.get(args.id)), indent=2))


def _jobs_cancel(client: VBServeClient, args: argparse.Namespace) -> None:
    job = client.jobs.cancel(args.id)
    print(f"cancelled {job.id}" if job.ended else f"cancel requested for {job.id}: it stops within a training step")


def _jobs_events(client: VBServeClient, args: argparse.Namespace) -> int:
    if not args.follow:
        for event in client.jobs.events(args.id):
            print(f"step {event.step}/{event.total_steps}: {_metrics(event)}")
        return 0
    job = client.jobs.get(args.id)
    for update in client.jobs.follow(args.id):
        if isinstance(update, FineTuningJob):
            job = update
            print(f"{job.id}: {job.status}")
        else:
            print(f"step {update.step}/{update.total_steps}: {_metrics(update)}", flush=True)
    return _exit_code(job)


if __name__ == "__main__":
    sys.exit(main())

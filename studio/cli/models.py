"""`studio models ...`: inspect, add, list, remove and scan models. Imports neither torch nor Qt.

Also runs standalone: `python -m studio.cli.models info FILE`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from studio.errors import UserError
from studio.library.detect import ROLES, Detection, detect
from studio.library.headers import HeaderError
from studio.library.library import Library, LibraryError, ModelEntry
from studio.library.scan import default_locations, scan
from studio.units import fmt_bytes


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `models` and its sub-commands on an argparse sub-parser set."""
    p = subparsers.add_parser("models", help="inspect, add, list, remove and scan models",
                              description="Model library: what a file is, and which models Studio knows.")
    sub = p.add_subparsers(dest="models_command", metavar="COMMAND")
    sub.required = True
    info = sub.add_parser("info", help="what a model file or folder is (reads headers only)")
    info.add_argument("file", metavar="FILE")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.add_argument("--quant", choices=["int8", "int4", "fp8"], default=None,
                      help="also measure what this quantization saves and costs (loads the model: slow)")
    add = sub.add_parser("add", help="register a model (in place by default)")
    add.add_argument("path", metavar="PATH")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy it into Studio's models folder")
    how.add_argument("--link", action="store_true", help="symlink it into Studio's models folder")
    add.add_argument("--family", metavar="F", help="override the detected family")
    add.add_argument("--name", help="name in the library (default: the file name)")
    add.add_argument("--json", action="store_true")
    ls = sub.add_parser("list", help="installed models")
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--role", choices=ROLES, metavar="R", help="only this role: " + ", ".join(ROLES))
    rm = sub.add_parser("remove", help="forget a model; its file stays unless --delete-file")
    rm.add_argument("name", metavar="NAME", help="the model's exact name, or #ID for its id (see `models list`)")
    rm.add_argument("--delete-file", action="store_true", help="also delete the file from disk")
    sc = sub.add_parser("scan", help="register models from folders other tools use")
    sc.add_argument("folders", nargs="*", metavar="FOLDER",
                    help="folders to scan (default: ComfyUI, A1111, HF cache, LM Studio, Ollama if present)")
    sc.add_argument("--json", action="store_true")
    pl = sub.add_parser("pull", help="download a model from Hugging Face or a URL into the library",
                        description="REPO (owner/name), REPO/FILE, a hub link, a direct URL (Civitai...), or a "
                        "starter's id (`studio models starters`). Resumes an interrupted pull.")
    pl.add_argument("source", metavar="SOURCE")
    pl.add_argument("--token", default=None, help="access token for gated models (default: $HF_TOKEN)")
    pl.add_argument("--json", action="store_true")
    st = sub.add_parser("starters", help="good first models to pull, with size, licence and hardware")
    st.add_argument("--json", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Execute a parsed `models` command. Returns the exit code (2 on a user error)."""
    try:
        match args.models_command:
            case "info":
                det = detect(args.file)
                data = det.to_dict()
                if getattr(args, "quant", None):
                    data["quantization"] = _quant_report(args.file, args.quant)
                _out(args, data, lambda: _format_detection(det) + _format_quant(data.get("quantization")))
                return 0
            case "add":
                mode = "copy" if args.copy else "link" if args.link else "inplace"
                with Library() as lib:
                    e = lib.add(args.path, mode=mode, family=args.family, name=args.name)
                _out(args, e.to_dict(), lambda: f"added {e.name!r}: {_describe(e)}\n  {e.path}")
            case "list":
                with Library() as lib:
                    lib.ensure_bundled()  # the model Chat uses with no other installed is listed too
                    entries = lib.list(role=args.role)
                _out(args, {"models": [e.to_dict() for e in entries]}, lambda: _table(entries))
            case "remove":
                with Library() as lib:
                    e = lib.remove(args.name, delete_file=args.delete_file)
                kept = "file deleted" if args.delete_file else "file kept"
                print(f"removed {e.name!r} ({kept}: {e.path})")
            case "pull":
                return _pull(args)
            case "starters":
                from studio.families import STARTERS

                _out(args, {"starters": [{**s.__dict__, "runs": s.runs} for s in STARTERS]}, _starters_table)
            case "scan":
                folders = args.folders or default_locations()
                if not folders:
                    raise LibraryError("no known model folders on this machine; pass the folders to scan")
                absent = [str(f) for f in folders if not Path(f).expanduser().is_dir()]
                if absent:
                    raise LibraryError(f"not a folder: {', '.join(absent)}; pass folders that hold models")
                with Library() as lib:
                    report = scan(lib, folders)
                _out(args, {"added": report.added, "updated": report.updated, "missing": report.missing,
                            "returned": report.returned, "unchanged": report.unchanged,
                            "errors": [{"path": p, "message": m} for p, m in report.errors]},
                     lambda: _format_scan(report))
            case _:
                raise LibraryError(f"unknown models command {args.models_command!r}")
    except BrokenPipeError:  # output piped into `head`: not an error
        return 0
    except (HeaderError, LibraryError, OSError) as e:
        print(f"studio models: {_one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _quant_report(path: str, mode: str) -> dict:
    """Runs in this process with torch (the CLI may; the GUI never calls this)."""
    from studio.engine.quant_report import quant_report

    try:
        return quant_report(path, mode)
    except UserError as e:
        raise LibraryError(e.message) from None


def _format_quant(q: dict | None) -> str:
    if not q:
        return ""
    return (f"\nquantized:   {q['mode']} {q['component']}: {fmt_bytes(q['bytes_original'])} -> "
            f"{fmt_bytes(q['bytes_quantized'])} ({q['ratio']:.0%}), saves {fmt_bytes(q['bytes_saved'])}; "
            f"error on a fixed input: max {q['relative_error']:.2%} of the largest output, "
            f"mean abs {q['mean_abs_error']:.4g}")


def _one_line(e: Exception) -> str:
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    if isinstance(e, OSError) and e.filename:
        text = f"{e.filename}: {text}"
    return " ".join(text.split())


def _out(args: argparse.Namespace, obj: dict, human: Any) -> None:
    print(json.dumps(obj, default=str) if getattr(args, "json", False) else human())


def human_count(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _format_detection(d: Detection) -> str:
    rows = [("family", d.family), ("variant", d.variant or "-"), ("role", d.role.replace("_", " ")),
            ("format", f"{d.format} ({d.layout})" if d.layout else d.format), ("dtype", d.dtype or "-"),
            ("parameters", f"{human_count(d.params)} ({d.params:,})"
             + (f", {human_count(d.active_params)} active per token" if d.active_params else "")),
            ("file size", fmt_bytes(d.file_size)),
            ("RAM to run", f"~{fmt_bytes(d.ram_bytes)} (CPU)"),
            ("VRAM to run", f"~{fmt_bytes(d.vram_bytes)} (fully on GPU)")]
    if d.prediction:
        rows.append(("prediction", d.prediction))
    if d.compatible:
        rows.append(("works with", ", ".join(d.compatible)))
    lines = [f"{k + ':':<12} {v}" for k, v in rows]
    lines.append("matched:     " + (", ".join(d.markers[:8]) or "-") + (" ..." if len(d.markers) > 8 else ""))
    lines += [f"note:        {n}" for n in d.notes]
    return "\n".join(lines)


def _describe(e: ModelEntry) -> str:
    fam = e.effective_family + (f" (detected {e.family})" if e.family_override else "")
    return f"{fam} {e.variant} {e.role.replace('_', ' ')}, {fmt_bytes(e.size)}"


def _table(entries: list[ModelEntry]) -> str:
    if not entries:
        return "no models yet: `studio models add FILE` or `studio models scan FOLDER`"
    head = ("NAME", "FAMILY", "VARIANT", "ROLE", "SIZE", "WHERE")
    rows = [(e.name.replace("\n", " "), e.effective_family, e.variant, e.role, fmt_bytes(e.size),
             "MISSING " + str(e.path) if e.missing else ("(bundled) " if "bundled" in e.tags else "") + str(e.path))
            for e in entries]
    widths = [min(40, max(len(r[i]) for r in [head, *rows])) for i in range(5)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    return "\n".join(fmt.format(*(c[:40] if i < 5 else c for i, c in enumerate(r))) for r in [head, *rows])


def _starters_table() -> str:
    from studio.families import STARTERS

    lines = []
    for s in STARTERS:
        gpu = f"GPU {fmt_bytes(s.min_vram)}+" if s.min_vram else "CPU ok"
        runs = "" if s.runs else "  (Studio cannot run it yet)"
        lines.append(f"{s.id:<14} {s.label}{runs}\n{'':<14} {fmt_bytes(s.size)}, {s.licence}, RAM "
                     f"{fmt_bytes(s.min_ram)}+, {gpu}. {s.note}")
    return "\n".join(lines) + "\n\nstudio models pull ID  downloads one."


def _pull(args: argparse.Namespace) -> int:
    import threading

    from studio.families import starter
    from studio.library.download import DownloadError, Progress, pull

    found = starter(args.source)
    sources = [f"{found.repo}/{f}" for f in (found.file, *found.companions)] if found else [args.source]
    tty = sys.stderr.isatty() and not args.json
    cancel = threading.Event()

    def show(p: Progress) -> None:
        if not tty:
            return
        total = f" / {fmt_bytes(p.total)}" if p.total else ""
        speed = f"  {fmt_bytes(int(p.speed))}/s" if p.speed else ""
        eta = f"  {int(p.eta // 60)}:{int(p.eta % 60):02d} left" if p.eta is not None and p.stage == "downloading" else ""
        sys.stderr.write(f"\r\x1b[2K{p.stage} {Path(p.file).name}: {fmt_bytes(p.done)}{total}{speed}{eta}")
        sys.stderr.flush()

    entries = []
    with Library() as lib:
        for source in sources:
            try:
                entries.append(pull(source, lib, token=args.token, progress=show, cancel=cancel))
            except KeyboardInterrupt:
                print("\nstopped; run the same command again to resume", file=sys.stderr)
                return 130
            except DownloadError as exc:
                if tty:
                    sys.stderr.write("\r\x1b[2K")
                print(f"studio models: {exc}", file=sys.stderr)
                return 2
            if tty:
                sys.stderr.write("\r\x1b[2K")
    for e in entries:
        _out(args, e.to_dict(), lambda e=e: f"installed {e.name!r}: {_describe(e)}\n  {e.path}")
    return 0


def _format_scan(r: Any) -> str:
    lines = [r.summary()]
    lines += [f"  + {n}" for n in r.added] + [f"  ~ {n}" for n in r.updated]
    lines += [f"  - {n} (missing)" for n in r.missing] + [f"  ! {p}: {m}" for p, m in r.errors]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="studio")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["models", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())

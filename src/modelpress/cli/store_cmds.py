"""`modelpress store init | put | get | ls | log | diff | tag | verify | gc`: thin commands over modelpress.store."""

from __future__ import annotations

import json
import time

from rich.table import Table

from modelpress import fileio
from modelpress.cli.argtypes import seconds
from modelpress.cli.console import console as _console
from modelpress.cli.console import progress as _progress
from modelpress.cli.remote_cmds import add_remote_commands
from modelpress.cli.search_cmds import cmd_store_report
from modelpress.errors import ModelpressError, StoreError
from modelpress.formats.checkpoint import save
from modelpress.formats.models import load_model
from modelpress.store import GC_GRACE, Store, layout
from modelpress.store.remote_backend import is_url

__all__ = ["add_store_commands"]


def _open(path: str):
    return Store.open(path) if is_url(path) else Store(path)  # a URL: read straight from a remote


def cmd_init(args) -> int:
    Store.init(args.store).close()
    _console().print(f"store ready at {args.store}")
    return 0


def cmd_put(args) -> int:
    model = load_model(args.source)  # a checkpoint, a model folder, a .gguf file or a bundled name
    bad = [item for item in args.codec or () if "=" not in item]
    if bad:
        raise ModelpressError(f"--codec {bad[0]!r} is not PATTERN=CODEC: write e.g. --codec '*embeddings*=raw'")
    codecs = dict(item.split("=", 1) for item in args.codec or ())
    blocks = {}
    for item in args.chunk_bytes or ():
        pattern, _, size = item.rpartition("=")
        if not pattern or not size.isdigit():
            raise ModelpressError(f"--chunk-bytes {item!r} is not PATTERN=BYTES: write e.g. "
                                  "--chunk-bytes '*embed_tokens.weight=16384'")
        blocks[pattern] = int(size)
    with _open(args.store) as store, _progress() as progress:
        parent = None if args.no_parent else args.parent
        task = progress.add_task(f"storing {args.name}", total=len(model.state_dict()))
        vid = store.put(model, args.name, parent=parent, message=args.message or "", tags=tuple(args.tag or ()),
                        codecs=codecs, progress=lambda k: progress.advance(task, k), chunk_bytes=blocks,
                        planes=args.planes)
        _console().print(f"{args.name}@{vid[:12]}: {store.stored_bytes(args.name, vid) / 1e6:.1f} MB in chunks")
    return 0


def cmd_get(args) -> int:
    with _open(args.store) as store:
        if args.out is None:

            vid = store.resolve(args.name, args.ref)
            table = Table(title=f"{args.name}@{vid[:12]}")
            for col in ("tensor", "dtype", "shape", "chunks", "layout"):
                table.add_column(col)
            tensors = store.catalog.tensors(vid)
            rows = store.catalog.chunks([c for t in tensors for c in t.chunks])
            for t in tensors:
                chunk_rows = [rows[c] for c in t.chunks]
                how = layout.describe(t.dtype, t.shape, [r.raw_size for r in chunk_rows],
                                      [r.codec.name for r in chunk_rows])
                table.add_row(t.name, t.dtype, "x".join(map(str, t.shape)) or "scalar", str(len(t.chunks)), how)
            _console().print(table)
            return 0
        # refuse an --out that is, holds or lies in the store (or is not ours to replace) before any work
        fileio.check_output_dir(args.out, args.overwrite, [store.root])
        model = store.load(args.name, args.ref)

        save(model, args.out, overwrite=args.overwrite, protected=[store.root])
        _console().print(f"wrote {args.name}@{args.ref} to {args.out}")
    return 0


def cmd_ls(args) -> int:
    with _open(args.store) as store:
        for name, count in store.models():
            latest = store.resolve(name, "latest")
            _console().print(f"{name}  {count} version(s), latest {latest[:12]}")
    return 0


def cmd_log(args) -> int:
    with _open(args.store) as store:
        for v in store.log(args.name):
            tags = f" ({', '.join(v.tags)})" if v.tags else ""
            parent = f" parent {v.parent[:12]}" if v.parent else ""
            added = store.stored_bytes(args.name, v.id, exclusive_of=v.parent) if v.parent else store.stored_bytes(args.name, v.id)
            _console().print(f"{v.id[:12]}{tags}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(v.created))}"
                             f"{parent}  +{added / 1e6:.1f} MB  {v.message}")
    return 0


def cmd_diff(args) -> int:
    with _open(args.store) as store:
        rows = store.diff(args.name, args.a, args.b)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    changed = [r for r in rows if r["status"] != "same"]
    for r in changed:
        extra = ""
        if "rel_l2" in r:
            extra = f"  max|d| {r['max_abs']:.3g}  rel L2 {r['rel_l2']:.3g}  chunks {r['changed_chunks']}"
        elif "detail" in r:
            extra = f"  {r['detail']}"
        _console().print(f"{r['status']:8s} {r['tensor']}{extra}")
    _console().print(f"{len(changed)} of {len(rows)} tensors differ")
    return 0


def cmd_tag(args) -> int:
    with _open(args.store) as store:
        vid = store.tag(args.name, args.ref, args.tag)
    _console().print(f"{args.name}:{args.tag} -> {vid[:12]}")
    return 0


def cmd_verify(args) -> int:
    with _open(args.store) as store, _progress() as progress:
        task = progress.add_task("verifying chunks", total=len(store.catalog.all_chunk_ids()))
        report = store.verify(progress=lambda k: progress.advance(task, k))
    if report.ok:
        _console().print(f"ok: {report.checked} chunks verified, and the catalogue and every version's root hash")
        return 0
    for line in report.problems:
        print(line)
    raise StoreError(f"{len(report.corrupt)} corrupt and {len(report.missing)} missing chunks, {len(report.versions)} "
                     f"damaged versions, {len(report.catalogue)} catalogue problems: restore them from a remote or "
                     "a backup")


def cmd_gc(args) -> int:
    grace = GC_GRACE if args.grace is None else args.grace
    with _open(args.store) as store:
        report = store.gc(grace=grace)
    kept = f"; kept {report.kept_young} younger than {grace:g} s (--grace 0 removes them)" if report.kept_young else ""
    _console().print(f"removed {report.chunks_removed} chunks ({report.bytes_removed / 1e6:.1f} MB) "
                     f"and {report.temporaries_removed} temporaries{kept}")
    return 0


def add_store_commands(sub) -> None:
    store = sub.add_parser("store", help="the model store: init, put, get, ls, log, diff, tag, verify, gc")
    cmds = store.add_subparsers(dest="store_command", required=True)

    def command(name, fn, help_text):
        p = cmds.add_parser(name, help=help_text)
        p.add_argument("store", help="the store folder")
        p.set_defaults(fn=fn)
        return p

    command("init", cmd_init, "create a store")
    add_remote_commands(cmds)
    p = command("put", cmd_put, "put a model folder or checkpoint in as a new version")
    p.add_argument("source", help="a modelpress checkpoint folder, a Hugging Face folder (sentence encoder or causal "
                                   "LM), a .gguf file, or a bundled name (minilm, smollm2)")
    p.add_argument("name", help="model name in the store")
    p.add_argument("--parent", default="latest", help="version or ref to record as parent (default latest)")
    p.add_argument("--no-parent", action="store_true", help="record no parent (no deltas)")
    p.add_argument("--tag", action="append", help="also point this tag at the new version")
    p.add_argument("-m", "--message")
    p.add_argument("--codec", action="append", metavar="PATTERN=CODEC",
                   help="force a codec (raw, aligned, zstd, planes, fans) for tensors matching PATTERN; 'aligned' "
                        "stores raw bytes on page boundaries, which load by mapping (fastest load), e.g. "
                        "'*embeddings*=aligned'")
    p.add_argument("--chunk-bytes", action="append", metavar="PATTERN=BYTES",
                   help="row-block size for tensors matching PATTERN (default 1 MiB), e.g. small blocks for an "
                        "embedding table read by lookups: '*embed_tokens.weight=16384'")
    p.add_argument("--planes", action="append", metavar="PATTERN",
                   help="store float32 tensors matching PATTERN as a bfloat16 plane and a low plane, so that a load "
                        "at bf16 precision reads about half the bytes (Store.load(precision='bf16'), then refine)")
    p = command("get", cmd_get, "list a version's tensors, or write it out as a checkpoint with --out")
    p.add_argument("name")
    p.add_argument("ref", nargs="?", default="latest")
    p.add_argument("--out", help="write the model to this folder")
    p.add_argument("--overwrite", action="store_true")
    command("ls", cmd_ls, "list models")
    p = command("log", cmd_log, "list a model's versions, newest first")
    p.add_argument("name")
    p = command("diff", cmd_diff, "which tensors changed between two versions, and by how much")
    p.add_argument("name")
    p.add_argument("a")
    p.add_argument("b", nargs="?", default="latest")
    p.add_argument("--json", action="store_true")
    p = command("tag", cmd_tag, "name a version")
    p.add_argument("name")
    p.add_argument("ref")
    p.add_argument("tag")
    p = command("report", cmd_store_report, "an HTML report: versions, lineage, bytes added per version, dedup")
    p.add_argument("--out", required=True, help="the HTML file to write")
    command("verify", cmd_verify, "recheck the catalogue, every version's root hash and every chunk's hash")
    p = command("gc", cmd_gc, "remove unreferenced chunks and temporaries")
    p.add_argument("--grace", type=seconds, default=None, metavar="SECONDS",
                   help="keep unreferenced files younger than this (default 3600: a writer may still need them)")

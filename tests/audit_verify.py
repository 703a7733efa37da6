#!/usr/bin/env python3
"""Verify a cordon audit export with nothing but Python's standard library.

    cordon audit export --config FILE | python3 tests/audit_verify.py

This is the procedure SECURITY.md documents for auditors: each line is one
record in canonical JSON (keys sorted, no whitespace); hash = SHA-256 over the
previous record's hash (64 hex chars; 64 zeros before the first record)
followed by the canonical record without its "hash" field. Exit 0 and the
count, or exit 1 naming the first bad seq.
"""
import hashlib
import json
import sys


def canonical(v):
    return json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def main():
    prev_hash, prev_seq, count = None, None, 0
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        rec = json.loads(line)
        seq = rec["seq"]
        if canonical(rec) != line:
            sys.exit(f"seq {seq}: not canonical")
        body = {k: v for k, v in rec.items() if k != "hash"}
        digest = hashlib.sha256((rec["prev"] + canonical(body)).encode()).hexdigest()
        if digest != rec["hash"]:
            sys.exit(f"seq {seq}: hash mismatch")
        if prev_seq is None:
            if seq == 1 and rec["prev"] != "0" * 64:
                sys.exit("seq 1: does not start from the genesis hash")
        else:
            if seq != prev_seq + 1:
                sys.exit(f"seq {seq}: gap after {prev_seq}")
            if rec["prev"] != prev_hash:
                sys.exit(f"seq {seq}: prev does not match seq {prev_seq}")
        prev_hash, prev_seq, count = rec["hash"], seq, count + 1
    print(f"ok: {count} records")


if __name__ == "__main__":
    main()

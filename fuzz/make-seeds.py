#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/seeds/<target>/seed-<n>: four inputs of pseudo-random bytes
per target, of 64 to 4096 bytes (libFuzzer's default -max_len), the same every time.

Random bytes are good seeds here: the targets decode their input with the `arbitrary` crate
into lists whose lengths come first (so any bytes give several chains, records, register
accesses or lines) of elements that are well-formed unless a roll of a byte says otherwise,
and all-zero where the input runs out; ext4_superblock builds a superblock from half of its
inputs itself. snapshot_state's seeds are not written here: they are the state of a real
snapshot of the test guest (8 bytes of memory-file length, then state.json), as JSON is what
its parser reads.""" 
import pathlib
import random

TARGETS = ["fphash_request", "virtio_blk", "mmio_registers", "kernel_loader", "console_verdict",
           "dedupd_messages", "ext4_superblock", "virtio_balloon", "virtio_entropy"]
SIZES = [64, 512, 2048, 4096]

here = pathlib.Path(__file__).resolve().parent
for target in TARGETS:
    out = here / "seeds" / target
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(target)
    for n, size in enumerate(SIZES):
        (out / f"seed-{n}").write_bytes(bytes(rng.randrange(256) for _ in range(size)))

#!/usr/bin/env python3
"""Writes the seed corpus, fuzz/seeds/<target>/seed-<n>: four inputs of pseudo-random bytes
per target, of 64 to 4096 bytes (libFuzzer's default -max_len), the same every time.

Random bytes are good seeds here: the targets decode their input with the `arbitrary` crate
into lists whose lengths come first (so any bytes give several chains, records, register
accesses or lines) of elements that are well-formed unless a roll of a byte says otherwise,
and all-zero where the input runs out; ext4_superblock builds a superblock from half of its
inputs itself. snapshot_state's seeds are not written here: they are the state of a real
snapshot of the test guest (8 bytes of memory-file length, then state.json), as JSON is what
its parser reads. api_request's seeds are HTTP requests as clients send them (curl's, a
pipelined pair, a body over the limit), since the target reads the bytes as they come.""" 
import pathlib
import random

TARGETS = ["fphash_request", "virtio_blk", "mmio_registers", "kernel_loader", "console_verdict",
           "dedupd_messages", "ext4_superblock", "virtio_balloon", "virtio_entropy", "virtio_vsock", "virtio_net"]
SIZES = [64, 512, 2048, 4096]

here = pathlib.Path(__file__).resolve().parent
for target in TARGETS:
    out = here / "seeds" / target
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(target)
    for n, size in enumerate(SIZES):
        (out / f"seed-{n}").write_bytes(bytes(rng.randrange(256) for _ in range(size)))

API_REQUESTS = [
    b"GET / HTTP/1.1\r\nHost: localhost\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    b"Content-Length: 38\r\n\r\n{\"vcpu_count\": 1, \"mem_size_mib\": 64}",
    b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 79\r\n\r\n{\"drive_id\": \"rootfs\", "
    b"\"path_on_host\": \"/i\", \"is_root_device\": true, \"is_read_only\": true}"
    b"PATCH /vm HTTP/1.1\r\nContent-Length: 19\r\nConnection: close\r\n\r\n{\"state\": \"Paused\"}",
    b"PUT /snapshot/create HTTP/1.1\r\nContent-Length: 70\r\n\r\n{\"snapshot_type\": \"Full\", "
    b"\"snapshot_path\": \"s\", \"mem_file_path\": \"m\"}",
]
out = here / "seeds" / "api_request"
out.mkdir(parents=True, exist_ok=True)
for n, request in enumerate(API_REQUESTS):
    (out / f"seed-{n}").write_bytes(request)

#!/usr/bin/env python
"""Checks that a shared library carries CUDA device code for the wanted GPUs, without a GPU or
cuobjdump: it reads the library's ``.nv_fatbin`` ELF section, where nvcc puts one fat binary per
compiled ``.cu`` file, and lists each entry's kind (SASS machine code or PTX) and architecture.

    python docker/check_fatbin.py LIBRARY [LIBRARY ...] [--archs "80;90"]

With ``--archs`` (the operator's ``RELABEL_DALI_CUDA_ARCHS``) every library must hold SASS for each
arch and PTX for the newest (``relabel_dali.ops.build.nvcc_gencode``): the image build fails when
the CUDA backend was not compiled or was compiled for other GPUs. Without it the entries are only
listed, as ``cuobjdump --list-elf --list-ptx`` would (one line per entry, e.g. ``sm_90 SASS``).

Layout (little-endian; the one nvcc has written since CUDA 4, and that cuobjdump reads): a fat
binary is a 16-byte header (magic 0xBA55ED50, version, header size, size of the entries) and then
entries, each a header (kind 1 = PTX, 2 = SASS; its own size; payload size; arch at byte 28)
followed by its payload, possibly compressed; only the headers are read here.

Exit codes: 0 listed / every wanted entry present, 1 missing entries or no fat binary, 2 bad
command line or not an ELF file.
"""
from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
FATBIN_HEADER = struct.Struct("<IHHQ")        # magic, version, header size, size of the entries
ENTRY_HEADER = struct.Struct("<HHIQ12xI")     # kind, version, header size, payload size, ..., arch (byte 28)
KINDS = {1: "PTX", 2: "SASS"}


def elf_section(data: bytes, name: str) -> bytes | None:
    """The contents of section ``name`` of a 64-bit little-endian ELF file (None if absent)."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for name_at, _, _, _, offset, size in headers:
        start = names_offset + name_at
        if data[start:data.index(b"\0", start)].decode() == name:
            return data[offset:offset + size]
    return None


def fatbin_entries(section: bytes) -> list[tuple[str, int]]:
    """(kind, arch) of every entry of every fat binary in a ``.nv_fatbin`` section, in order."""
    entries, at = [], 0
    while at + FATBIN_HEADER.size <= len(section):
        magic, _, header_size, size = FATBIN_HEADER.unpack_from(section, at)
        if magic != FATBIN_MAGIC:  # alignment padding between the fat binaries of several objects
            at += 8
            continue
        entry, end = at + header_size, at + header_size + size
        while entry + ENTRY_HEADER.size <= end:
            kind, _, entry_header, payload, arch = ENTRY_HEADER.unpack_from(section, entry)
            if entry_header == 0:
                break
            entries.append((KINDS.get(kind, f"kind {kind}"), arch))
            entry += entry_header + payload
        at = end
    return entries


def missing(entries: list[tuple[str, int]], archs: list[int]) -> list[str]:
    """What ``archs`` asks for and ``entries`` lacks: SASS for each arch, PTX for the newest."""
    wanted = [("SASS", arch) for arch in archs] + [("PTX", max(archs))]
    return [f"{kind} sm_{arch}" if kind == "SASS" else f"PTX compute_{arch}"
            for kind, arch in wanted if (kind, arch) not in entries]


def parse_archs(raw: str) -> list[int]:
    archs = [part.strip() for part in raw.replace(",", ";").split(";") if part.strip()]
    if not archs or not all(part.isdigit() for part in archs):
        raise ValueError(f"--archs {raw!r}: expected compute capabilities like '80;90'")
    return [int(part) for part in archs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+", type=Path)
    parser.add_argument("--archs", help="fail unless each library has SASS for these and PTX for the newest")
    args = parser.parse_args(argv)
    try:
        archs = parse_archs(args.archs) if args.archs is not None else None
    except ValueError as error:
        parser.error(str(error))
    failed = False
    for library in args.libraries:
        try:
            section = elf_section(library.read_bytes(), ".nv_fatbin")
        except (OSError, ValueError) as error:
            print(f"check_fatbin.py: {library}: {error}", file=sys.stderr)
            return 2
        entries = fatbin_entries(section) if section is not None else []
        kinds = sorted(set(entries), key=lambda e: (e[1], e[0]))
        listed = ", ".join(f"{'sm' if kind == 'SASS' else 'compute'}_{arch} {kind}" for kind, arch in kinds)
        print(f"{library}: {len(entries)} device code entries: {listed or 'none (no CUDA code)'}")
        problems = missing(entries, archs) if archs else []
        if problems:
            print(f"check_fatbin.py: {library} lacks {', '.join(problems)}: the CUDA backend was not compiled "
                  f"for RELABEL_DALI_CUDA_ARCHS={args.archs}", file=sys.stderr)
            failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

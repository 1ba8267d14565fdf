"""Write each member of a packed ensemble (``ferkit export --model A,B``) back out as its own model file.

Usage: python scripts/unpack_members.py SRC OUTDIR    (SRC: a model file or bundled name, e.g. fer7-large)

Run directories do not outlive a sitting; the bundled ensembles do. This takes them apart again so their members can
be re-scored, re-combined (``benchmarks/tta_views.py``) or used as teachers. Built-in TTA around the ensemble
(``views[...](ensemble(...))``) is dropped: each member file is the bare network, uncalibrated (the ensemble's
temperature belongs to the average, not to a member). Files are ``OUTDIR/<stem>-m<i>.safetensors``; nothing is
unpickled and an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ferkit.models.ensemble import Ensemble, ViewTTA
from ferkit.modelfile import load_model, resolve_model_path, save_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("outdir")
    a = ap.parse_args(argv)
    net, meta = load_model(a.src)
    inner = net.net if isinstance(net, ViewTTA) else net
    if not isinstance(inner, Ensemble):
        print(f"unpack_members: {a.src}: '{meta.arch}' is not an ensemble", file=sys.stderr)
        return 2
    stem = resolve_model_path(a.src).stem
    outs = [Path(a.outdir) / f"{stem}-m{i}.safetensors" for i in range(len(inner.members))]
    taken = [str(p) for p in outs if p.exists()]
    if taken:
        print(f"unpack_members: {taken[0]}: already exists; not overwritten", file=sys.stderr)
        return 2
    for i, (member, out) in enumerate(zip(inner.members, outs)):
        training = {**meta.training, "unpacked": f"member {i} of {a.src} ({meta.arch}), scripts/unpack_members.py"}
        m_meta = dataclasses.replace(meta, arch=member_arch(meta.arch, i), temperature=1.0, temperature_poly=(),
                                     metrics={}, name="", training=training)
        print(f"wrote {save_model(out, member, m_meta)} ({m_meta.arch})")
    return 0


def member_arch(arch: str, i: int) -> str:
    """The architecture string of member ``i`` of ``arch`` (an ensemble, possibly with built-in TTA around it)."""
    from ferkit.models.ensemble import ensemble_members, tta_inner

    members = ensemble_members(tta_inner(arch) or arch)
    assert members is not None
    return members[i]


if __name__ == "__main__":
    sys.exit(main())

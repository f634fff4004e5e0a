"""Hub references ("org/name" or "org/name@revision") and the revision they resolve to.

A stage id must change when what it reads changes. A local file is hashed by content; a hub
dataset or model is named, and its revision is part of the id when it is known: pinned in
the reference (`org/name@abc123`), or the commit the local Hugging Face cache resolved
`main` to (`<HF_HUB_CACHE>/<kind>s--org--name/refs/main`, the cache layout of
huggingface_hub). Read offline from the cache directory, so `plan` on a login node without
huggingface_hub or a network still sees it.
"""

from __future__ import annotations

import os
from pathlib import Path


def split_ref(ref: str) -> tuple[str, str | None]:
    """"org/name@rev" -> ("org/name", "rev"); "org/name" -> ("org/name", None)."""
    name, sep, rev = ref.partition("@")
    return name, (rev or None) if sep else None


def cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(os.environ["HUGGINGFACE_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface")
    return Path(home) / "hub"


def cached_revision(name: str, kind: str, ref: str = "main") -> str | None:
    """The commit the local cache resolved `ref` of hub repo `name` to, or None."""
    folder = cache_dir() / f"{kind}s--{name.replace('/', '--')}" / "refs" / ref
    try:
        commit = folder.read_text().strip()
    except OSError:
        return None
    return commit or None


def identity(ref: str, kind: str) -> str:
    """What a stage id hashes for a hub reference: "hub:org/name@commit" when the revision
    is pinned or cached, "hub:org/name" otherwise."""
    name, rev = split_ref(ref)
    rev = rev or cached_revision(name, kind)
    return f"hub:{name}@{rev}" if rev else f"hub:{name}"

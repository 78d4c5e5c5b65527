"""A Hugging Face Hub id as a conversion source, resolved through huggingface_hub's own cache.

``moorize convert HuggingFaceTB/SmolLM2-135M-Instruct out/`` works as ``transformers`` does:
the files come from the cache (``HF_HUB_CACHE``), are downloaded when missing unless
``HF_HUB_OFFLINE=1``, and ``--revision`` picks a branch, tag or commit. Only what a
conversion reads is fetched (weights, configs, tokenizer files), never code.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import MoorizeError

# owner/name as the Hub spells repository ids; a path that exists locally always wins
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")

# what a conversion reads from a repository; code (*.py) is never fetched, never run
FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*", "*.jinja"]

EXAMPLE_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def looks_like_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and ".." not in text


def missing_source(path: Path) -> MoorizeError:
    """The error for a source that is neither on disk nor a Hub id: it names what would work."""
    return MoorizeError(f"{path} does not exist: give a model directory, a .gguf file or a Hub id such as "
                        f"{EXAMPLE_ID}; the SmolLM2-135M-Instruct that installs with moorize's test extras is "
                        f'the file that `moorize env --path smollm2` prints')


def resolve_source(source: str | os.PathLike, revision: str | None = None, *, gguf_file: str | None = None,
                   allow_pickle: bool = False) -> Path:
    """The local path of a conversion source: the path itself when it exists, else a Hub snapshot."""
    path = Path(source)
    text = os.fspath(source)
    if path.exists():
        if revision:
            raise MoorizeError(f"--revision is for a Hub id, and {path} is a local path")
        return path
    if not looks_like_hub_id(text):
        raise missing_source(path)
    return _snapshot(text, revision, gguf_file=gguf_file, allow_pickle=allow_pickle)


def _snapshot(repo_id: str, revision: str | None, *, gguf_file: str | None, allow_pickle: bool) -> Path:
    try:
        import huggingface_hub
        from huggingface_hub import constants, errors
    except ImportError:  # transformers depends on it; a broken environment is still one line
        raise MoorizeError(f"{repo_id} is not a local path, and resolving Hub ids needs huggingface_hub: "
                           "pip install huggingface_hub") from None
    patterns = [gguf_file] if gguf_file else FILES + (["*.bin"] if allow_pickle else [])
    if gguf_file:
        patterns += ["*.json"]
    offline = constants.HF_HUB_OFFLINE
    where = f"{repo_id}" + (f" at revision {revision}" if revision else "")
    try:
        folder = huggingface_hub.snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                                   local_files_only=offline)
    except errors.LocalEntryNotFoundError:
        raise MoorizeError(f"{where} is not a local path and not in the Hugging Face cache "
                           f"({constants.HF_HUB_CACHE})"
                           + (", and HF_HUB_OFFLINE is set" if offline else "")
                           + ": download it first (hf download " + repo_id + ") or give a local directory") from None
    except errors.GatedRepoError:
        raise MoorizeError(f"{where} is gated: accept its licence on the Hub and log in (hf auth login)") from None
    except errors.RevisionNotFoundError:
        raise MoorizeError(f"{repo_id} has no revision {revision!r}") from None
    except errors.RepositoryNotFoundError:
        raise MoorizeError(f"{repo_id} is not a local path, and the Hub has no model of that id (or it is private: "
                           "log in with hf auth login)") from None
    except (errors.HfHubHTTPError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoorizeError(f"cannot fetch {where} from the Hub: {first}") from None
    return Path(folder)

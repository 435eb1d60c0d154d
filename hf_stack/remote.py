"""Hub access every stage shares: repo-id checks and single-file downloads."""

from __future__ import annotations

from .errors import HfStackError, error_reason


def validate_repo_id(repo_id: str, source: bool = True) -> None:
    """Refuse ids the Hub would refuse; `source` says the string could also have been a local folder."""
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as _validate

    try:
        _validate(repo_id)
    except HFValidationError:
        what = "neither an existing folder nor a valid Hub repo id" if source else "not a valid Hub repo id"
        raise HfStackError(f"{repo_id!r} is {what} (write it as namespace/name)") from None


def hub_file(
    repo_id: str, filename: str, revision: str | None = None, token: str | None = None, cache_dir=None
) -> str:
    """Download one file of a Hub repo (honours HF_HUB_OFFLINE and the cache)."""
    from huggingface_hub import hf_hub_download

    validate_repo_id(repo_id)
    try:
        return hf_hub_download(repo_id, filename, revision=revision, token=token, cache_dir=cache_dir)
    except Exception as e:  # huggingface_hub raises many types; all mean "could not get it"
        raise HfStackError(f"cannot get {filename} from {repo_id!r}: {error_reason(e)}") from None

"""Hub access every stage shares: repo-id checks, single-file downloads and one wording for Hub errors."""

from __future__ import annotations

from .errors import HfStackError


def hub_reason(e: Exception) -> str:
    """`<ExceptionType>: <first line>` of a Hub client error, the form every hf_stack Hub message quotes."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


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
        raise HfStackError(f"cannot get {filename} from {repo_id!r}: {hub_reason(e)}") from None

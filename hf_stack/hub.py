"""Stage 5, the Hub: push any folder hf_stack wrote, with its model card, through `huggingface_hub`."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .checkpoints.card import apply_updates, update_card
from .errors import HfStackError, error_reason
from .evaluation.benchmarks import eval_results, results_table
from .remote import validate_repo_id


def resolve_token(token: str | None = None) -> str:
    """The token from the argument, `HF_TOKEN` or the saved login (`hf auth login`); never printed."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HfStackError("pushing needs a Hub token: set HF_TOKEN, run `hf auth login`, or pass --token")
    return token


def _scrub(text: str, token: str) -> str:
    """`text` without the token, nor the query of any URL (a signed storage URL is a credential too)."""
    text = text.replace(token, "***") if token else text
    return re.sub(r"(https?://[^\s?'\"]+)\?[^\s'\"]*", r"\1", text)


def _reason(e: BaseException, token: str) -> str:
    """`error_reason(e)`, followed by that of the error it was raised from: huggingface_hub's "Error while
    uploading 'model.safetensors' to the Hub." keeps the HTTP status in its cause."""
    reason = error_reason(e)
    if e.__cause__ is not None:
        reason = f"{reason.rstrip('.')}: {error_reason(e.__cause__)}"
    return _scrub(reason, token)


def _refused_token(e: BaseException) -> bool:
    """Whether the Hub answered 401, here or in the error this one was raised from: a token it does not know."""
    while e is not None:
        if getattr(getattr(e, "response", None), "status_code", None) == 401:
            return True
        e = e.__cause__
    return False


def _token_error(doing: str) -> HfStackError:
    return HfStackError(
        f"{doing} failed: the Hub refused the token (401 Unauthorized), nothing was committed; set a valid token "
        "in HF_TOKEN, with `hf auth login` or with --token"
    )


def default_repo_id(name: str, token: str) -> str:
    """`<your namespace>/<name>`, the namespace from `whoami`."""
    from huggingface_hub import HfApi

    try:
        user = HfApi().whoami(token=token)["name"]
    except Exception as e:
        if _refused_token(e):
            raise _token_error("finding your Hub namespace (whoami)") from None
        raise HfStackError(f"cannot find your Hub namespace (whoami failed): {_reason(e, token)}") from None
    return f"{user}/{name}"


def push(
    folder: str | os.PathLike,
    repo_id: str | None = None,
    *,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload a model folder (weights, config, tokenizer, card, growth_config.json) as one commit.

    The commit is atomic on the Hub: a push that fails midway leaves the repository as it was, and running the
    same push again completes it.

    Args:
        folder: a folder written by hf_stack (`grow`, `train`, `eval`).
        repo_id: target repo; default `<your namespace>/<folder name>`.
        private: create the repo private.
        revision: branch to push to (created from main if missing).
        token: Hub token (default: `HF_TOKEN` or the saved login).
        commit_message: defaults to "Upload <folder name> with hf_stack".

    Returns:
        The repo URL.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise HfStackError(f"{folder} is not a model folder (no config.json); push a folder hf_stack wrote")
    token = resolve_token(token)
    if repo_id is None:
        repo_id = default_repo_id(folder.resolve().name, token)
    validate_repo_id(repo_id, source=False)
    update_card(folder, repo_id, figure=True)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        api.upload_folder(
            folder_path=folder,
            repo_id=repo_id,
            revision=revision,
            commit_message=commit_message or f"Upload {folder.resolve().name} with hf_stack",
            ignore_patterns=[".*", "*.tmp", "checkpoint-*/*"],
        )
    except HfStackError:
        raise
    except Exception as e:
        if _refused_token(e):
            raise _token_error(f"push to {repo_id}") from None
        raise HfStackError(
            f"push to {repo_id} failed ({_reason(e, token)}); nothing was committed, run the same command again"
        ) from None
    return str(url)


def push_eval(repo_id: str, results: dict, *, token: str | None = None, revision: str | None = None) -> str:
    """Write evaluation results into a Hub model's card: the model-index (front matter) and the evaluation
    section; other sections stay as they are, so re-running replaces rather than duplicates."""
    from huggingface_hub import ModelCard

    token = resolve_token(token)
    validate_repo_id(repo_id, source=False)
    try:
        card = ModelCard.load(repo_id, token=token)
        apply_updates(card, repo_id, {"evaluation": results_table(results)}, eval_results(results))
        card.push_to_hub(repo_id, token=token, revision=revision, commit_message="Evaluation results from hf_stack")
    except Exception as e:
        if _refused_token(e):
            raise _token_error(f"pushing results to {repo_id}") from None
        raise HfStackError(f"pushing results to {repo_id} failed ({_reason(e, token)}); run again") from None
    return repo_id

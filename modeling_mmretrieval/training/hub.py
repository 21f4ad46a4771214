"""Publishing a trained retriever on the Hugging Face Hub (or any Hub at `HF_ENDPOINT`).

Example:
```python
>>> push_folder_to_hub("outputs/run/final", "my-user/fashion-retriever", private=True)
'https://huggingface.co/my-user/fashion-retriever/commit/...'
```
"""

import os
from pathlib import Path

from ..modeling_mmretrieval import MODEL_CARD_NAME, card_for_repo

# What `HfApi.upload_folder` leaves out of a folder too: git metadata and huggingface_hub's upload cache.
_NEVER_UPLOADED = (".git", ".cache")


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload trained retriever",
) -> str:
    """Create `repo_id` (if needed) and upload `folder` in one commit; returns the commit URL.

    `repo_id` without a namespace goes to the token's namespace. The model card's usage snippet then names the
    repository as created (`owner/name`): the uploaded README.md has the placeholder `your-namespace/<name>` filled
    in; the local folder stays as it is. The endpoint is `HF_ENDPOINT` (huggingface_hub's own setting), the token
    `token` or the logged-in one.

    Example:
    ```python
    >>> push_folder_to_hub("outputs/run/final", "my-user/fashion-retriever", private=True)
    'https://huggingface.co/my-user/fashion-retriever/commit/...'
    ```
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
    operations = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if not path.is_file() or relative.parts[0] in _NEVER_UPLOADED:
            continue
        content = str(path)
        if relative.as_posix() == MODEL_CARD_NAME:
            content = card_for_repo(path.read_text(encoding="utf-8"), repo_id).encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=relative.as_posix(), path_or_fileobj=content))
    commit = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message)
    return commit.commit_url


__all__ = ["push_folder_to_hub"]

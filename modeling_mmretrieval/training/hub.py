"""Publishing a trained retriever on the Hugging Face Hub (or any Hub at `HF_ENDPOINT`).

Example:
```python
>>> push_folder_to_hub("outputs/run/final", "my-user/fashion-retriever", private=True)
'https://huggingface.co/my-user/fashion-retriever/commit/...'
```
"""

import os


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload trained retriever",
) -> str:
    """Create `repo_id` (if needed) and upload `folder` with `huggingface_hub`; returns the commit URL.

    The endpoint is `HF_ENDPOINT` (huggingface_hub's own setting), the token `token` or the logged-in one.

    Example:
    ```python
    >>> push_folder_to_hub("outputs/run/final", "my-user/fashion-retriever", private=True)
    'https://huggingface.co/my-user/fashion-retriever/commit/...'
    ```
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(repo_id=repo_url.repo_id, folder_path=str(folder), commit_message=commit_message)
    return commit.commit_url


__all__ = ["push_folder_to_hub"]

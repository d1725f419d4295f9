"""Model card and push helpers, thin over huggingface_hub.

``write_model_card(output_dir, ...)`` writes the README.md a trained pipeline folder carries to the
Hub (YAML metadata, usage snippet, training arguments without secrets, final metrics, sample grid);
``push_folder(output_dir, repo_id, ...)`` creates the repository if needed and uploads the folder,
skipping intermediate checkpoints and logs. Tokens are only passed through, never written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import posixpath
import re
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

from .fileio import atomic_write, atomic_write_text

REQUIRED_TAGS = ("ddpm", "unconditional-image-generation", "ddpm-from-scratch", "diffusers")
DEFAULT_PUSH_IGNORE = (
    "checkpoint-*",
    "checkpoint-*/**",
    ".deleting-*",
    ".deleting-*/**",
    "previous-checkpoints-*",
    "previous-checkpoints-*/**",
    ".tmp*",
    "*.tmp",
    "*.tmp/**",
    "*.lock",
    "logs/**",
    "**/.ipynb_checkpoints/**",
)
_SECRET_KEY_PARTS = ("token", "password", "passwd", "secret", "api_key", "apikey", "credential",
                     "private_key", "access_key")
_TOKEN_VALUE_RE = re.compile(r"\b(hf_[A-Za-z0-9]{16,}|api_org_[A-Za-z0-9]{16,})\b")
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_METRIC_LABELS = {
    "loss": "final training loss",
    "bits_per_dim": "bits/dim (variational bound, test set)",
    "fdd": "Frechet distance on digits features (FDD)",
}


def is_secret_key(key: str) -> bool:
    """True when an argument name looks like it holds a credential (hub_token, password, ...)."""
    lowered = key.lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def _known_tokens(extra: Iterable[str | None] = ()) -> list[str]:
    """Token strings to scrub: the given ones, HF_TOKEN-like variables and the saved login."""
    tokens = [t for t in extra if t]
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_API_TOKEN"):
        if os.environ.get(var):
            tokens.append(os.environ[var])
    try:
        from huggingface_hub import get_token

        saved = get_token()
    except Exception:  # no login, unreadable token file: nothing more to scrub
        saved = None
    if saved:
        tokens.append(saved)
    return sorted({t for t in tokens if len(t) >= 8}, key=len, reverse=True)


def _scrub(text: str, tokens: Iterable[str]) -> str:
    """Replace any known token and anything shaped like a Hub token with <redacted>."""
    for token in tokens:
        text = text.replace(token, "<redacted>")
    return _TOKEN_VALUE_RE.sub("<redacted>", text)


def public_training_args(args: Any) -> dict[str, Any]:
    """Training settings with every secret-looking key (token, password, secret, api_key...) removed.

    ``args``: a dataclass instance (``trainer.TrainConfig``), a mapping, or None."""
    if args is None:
        return {}
    if dataclasses.is_dataclass(args) and not isinstance(args, type):
        args = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    if not isinstance(args, Mapping):
        raise TypeError(f"training_args must be a dataclass (TrainConfig) or a mapping, got {type(args).__name__}")
    return {str(k): v for k, v in args.items() if not is_secret_key(str(k))}


def _cell(value: Any) -> str:
    """A value as one Markdown table cell."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (list, tuple)):
        text = ", ".join(str(v) for v in value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _metric_cell(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _cell(value)
    return "nan" if math.isnan(value) else f"{value:.4f}"


def model_card_text(
    repo_id: str,
    *,
    dataset_name: str | None = None,
    training_args: Any = None,
    metrics: Mapping[str, Any] | None = None,
    sample_grid: str | None = None,
    details: Mapping[str, Any] | None = None,
    num_inference_steps: int | None = None,
    extra_tags: Iterable[str] = (),
    license: str = "apache-2.0",
    token: str | None = None,
    report_figure: str | None = None,
    class_names: Iterable[str] | None = None,
    guidance_scale: float | None = None,
) -> str:
    """The README.md text of a ScratchDDPMPipeline repository.

    ``repo_id``: the Hub id (or local folder) the usage snippet loads. ``dataset_name``: the training
    data; it also goes into the ``datasets`` metadata when it looks like a Hub dataset id.
    ``training_args``: rendered as a table with secret-looking keys dropped. ``metrics``: e.g.
    ``{"loss": 0.03, "bits_per_dim": 3.7, "fdd": 12.0}``. ``sample_grid``: image path relative to the
    card. ``report_figure``: the training report's main figure, relative to the card (``report/overview.png``;
    the page ``report.md`` beside it is linked). ``num_inference_steps``: used in the snippet (the pipeline default when None). Any known
    token (``token``, HF_TOKEN, the saved login) or Hub-token-shaped string is redacted.
    ``class_names``: a class-conditional model's classes (index = label); the card then says so, lists them,
    samples a class in the snippet (with ``guidance_scale``) and reads the sample grid as one row per class.
    """
    from huggingface_hub import ModelCardData

    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string (a Hub id 'user/name' or a folder), got {repo_id!r}")
    if num_inference_steps is not None and (not isinstance(num_inference_steps, int) or num_inference_steps < 1):
        raise ValueError(f"num_inference_steps must be a positive int or None, got {num_inference_steps!r}")
    for name, rel in (("sample_grid", sample_grid), ("report_figure", report_figure)):
        if rel is not None and (os.path.isabs(rel) or rel.startswith("..")):
            raise ValueError(f"{name} must be a path relative to the card, got {rel!r}")
    class_names = None if class_names is None else [str(c) for c in class_names]
    conditional_tags = ("class-conditional", "classifier-free-guidance") if class_names else ()
    tags = list(dict.fromkeys([*REQUIRED_TAGS, *conditional_tags, *extra_tags]))
    data = ModelCardData(
        library_name="diffusers",
        license=license,
        tags=tags,
        pipeline_tag="unconditional-image-generation",
        datasets=[dataset_name] if dataset_name and _HUB_ID_RE.match(dataset_name)
        and not os.path.exists(dataset_name) else None,
    )
    name = repo_id.rstrip("/").split("/")[-1]
    steps = f", num_inference_steps={num_inference_steps}" if num_inference_steps else ""
    kind = "An unconditional image diffusion model (DDPM, Ho et al. 2020)"
    call = f"batch_size=4, generator=generator{steps}"
    if class_names:
        kind = (f"A class-conditional image diffusion model (DDPM, Ho et al. 2020; {len(class_names)} classes, "
                "classifier-free guidance)")
        scale = f", guidance_scale={guidance_scale:g}" if guidance_scale is not None else ""
        call = f"class_labels=[{json.dumps(class_names[0])}] * 4{scale}, generator=generator{steps}"
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        f"{kind} trained with "
        "`ddpm-from-scratch`, a plugin for [diffusers](https://github.com/huggingface/diffusers)"
        + (f" on `{dataset_name}`." if dataset_name else "."),
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from ddpm_from_scratch import ScratchDDPMPipeline",
        "",
        f"pipe = ScratchDDPMPipeline.from_pretrained({json.dumps(repo_id)})",
        "generator = torch.Generator().manual_seed(0)",
        f"images = pipe({call}).images",
        'images[0].save("sample.png")',
        "```",
        "",
        "After `import ddpm_from_scratch`, `diffusers.DiffusionPipeline.from_pretrained` loads it too.",
        "",
    ]
    if class_names:
        lines += ["## Classes", "",
                  "`class_labels` takes a class index or name; `guidance_scale` s is classifier-free guidance "
                  "(0: unconditional, 1: conditional, > 1: more typical of the class).", "",
                  "| index | name |", "|---|---|"]
        lines += [f"| {i} | {_cell(n)} |" for i, n in enumerate(class_names)] + [""]
    if sample_grid:
        rows = f"One row per class ({', '.join(class_names)}).\n\n" if class_names else ""
        lines += ["## Samples", "", f"{rows}![samples]({sample_grid.replace(os.sep, '/')})", ""]
    if report_figure:
        page = posixpath.join(posixpath.dirname(report_figure.replace(os.sep, "/")), "report.md")
        lines += ["## Training report", "", f"![training report]({report_figure.replace(os.sep, '/')})", "",
                  f"Every panel (loss, metrics, samples over training, a denoising trajectory, the bound per "
                  f"timestep): [{page}]({page}).", ""]
    if details:
        lines += ["## Model", ""] + [f"- **{k}**: {_cell(v)}" for k, v in details.items()] + [""]
    if metrics:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {_METRIC_LABELS.get(k, k)} | {_metric_cell(v)} |" for k, v in metrics.items()]
        lines.append("")
    public = public_training_args(training_args)
    if public:
        lines += ["## Training arguments", "", "| argument | value |", "|---|---|"]
        lines += [f"| {k} | {_cell(v)} |" for k, v in sorted(public.items())]
        lines.append("")
    return _scrub("\n".join(lines), _known_tokens([token]))


def write_model_card(output_dir: str | os.PathLike, repo_id: str | None = None, *,
                     sample_grid: str | os.PathLike | None = None, **kwargs: Any) -> str:
    """Write ``output_dir/README.md`` (atomically) and return its path; see ``model_card_text``.

    ``repo_id`` defaults to ``output_dir`` itself (the snippet then loads the local folder).
    ``sample_grid`` may be relative to ``output_dir`` or absolute; an image outside ``output_dir``
    is copied into it so the card's relative link works once pushed.
    """
    output_dir = os.fspath(output_dir)
    if not os.path.isdir(output_dir):
        raise ValueError(f"output_dir must be an existing folder, got {output_dir!r}")
    grid = None
    if sample_grid is not None:
        grid_path = os.fspath(sample_grid)
        absolute = grid_path if os.path.isabs(grid_path) else os.path.join(output_dir, grid_path)
        if not os.path.isfile(absolute):
            raise ValueError(f"sample_grid must name an existing image, got {grid_path!r}")
        inside = os.path.realpath(absolute).startswith(os.path.realpath(output_dir) + os.sep)
        if not inside:
            target = os.path.join(output_dir, os.path.basename(absolute))
            source = absolute
            atomic_write(target, lambda tmp: shutil.copyfile(source, tmp))
            absolute = target
        grid = os.path.relpath(absolute, output_dir).replace(os.sep, "/")
    text = model_card_text(repo_id or output_dir, sample_grid=grid, **kwargs)
    return atomic_write_text(os.path.join(output_dir, "README.md"), text)


def _files_to_push(folder: str, ignore_patterns: Iterable[str]) -> list[str]:
    """Relative posix paths of the files upload_folder will send."""
    from huggingface_hub.utils import filter_repo_objects
    from huggingface_hub.utils._paths import DEFAULT_IGNORE_PATTERNS

    paths = []
    for dirpath, _, names in os.walk(folder):
        for name in names:
            paths.append(os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/"))
    return sorted(filter_repo_objects(paths, ignore_patterns=[*ignore_patterns, *DEFAULT_IGNORE_PATTERNS]))


def push_folder(
    output_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Upload DDPM pipeline trained with ddpm-from-scratch",
    ignore_patterns: Iterable[str] = DEFAULT_PUSH_IGNORE,
    revision: str | None = None,
):
    """Create ``repo_id`` if needed and upload ``output_dir`` to it as one commit.

    Intermediate checkpoints, temporary files and logs are skipped (``ignore_patterns``). The token
    is ``token``, else the environment / saved login; it is never written anywhere, and the upload is
    refused if any file to be sent contains it. Returns huggingface_hub's ``CommitInfo`` (a str: the
    commit URL; ``.oid``: the commit sha).
    """
    from huggingface_hub import HfApi

    folder = os.fspath(output_dir)
    if not os.path.isdir(folder):
        raise ValueError(f"output_dir must be an existing folder, got {folder!r}")
    if not isinstance(repo_id, str) or not _HUB_ID_RE.match(repo_id):
        raise ValueError(f"repo_id must look like 'user/name' (letters, digits, '-', '_', '.'), got {repo_id!r}")
    if isinstance(ignore_patterns, str):
        ignore_patterns = [ignore_patterns]
    ignore_patterns = list(ignore_patterns)
    files = _files_to_push(folder, ignore_patterns)
    if not files:
        raise ValueError(f"output_dir {folder!r} holds no file to push (all ignored by {ignore_patterns})")
    for rel in files:
        path = os.path.join(folder, rel)
        if os.path.getsize(path) > 64 * 2**20:
            continue  # weights: binary, not where a token ends up
        with open(path, "rb") as f:
            content = f.read()
        for secret in _known_tokens([token]):
            if secret.encode() in content:
                raise ValueError(f"refusing to push: {rel!r} contains a Hub token; remove it and retry")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(
        repo_id=repo.repo_id,
        folder_path=folder,
        commit_message=commit_message,
        ignore_patterns=ignore_patterns,
        revision=revision,
    )

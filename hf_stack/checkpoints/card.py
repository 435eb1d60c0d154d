"""Stage 2, model cards: every folder hf_stack writes carries a card, rendered once from the package's
`model_cards/template.md` (top level; `hf_stack.model_cards` when installed), then updated section by section.

Grow, train and eval each own one section between `<!-- hf_stack:NAME -->` markers; running one of them again
replaces its section and never duplicates it. Front matter is `huggingface_hub`'s `ModelCardData`.
"""

from __future__ import annotations

import json
import re
from importlib.resources import files
from pathlib import Path

from ..errors import HfStackError
from ..plans.config import GROWTH_CONFIG_NAME


def _template() -> Path:
    """The top-level model_cards/template.md, shipped inside the package as `hf_stack.model_cards` (pyproject.toml's
    package-dir), so a wheel install renders cards as the source checkout does; a checkout used without installing
    (on PYTHONPATH) has no such package, and reads the folder beside `hf_stack/`."""
    try:
        return Path(str(files("hf_stack.model_cards") / "template.md"))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "model_cards" / "template.md"


TEMPLATE = _template()
SECTIONS = ("growth", "training", "evaluation", "usage")
PLACEHOLDER = {
    "growth": "Not grown by hf_stack.",
    "training": "No training recorded by hf_stack yet.",
    "evaluation": "Not evaluated by hf_stack yet.",
    "usage": "",
}


def usage_section(repo_id: str) -> str:
    return (
        "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")\n```'
    )


def _section_pattern(name: str):
    return re.compile(rf"(<!-- hf_stack:{name} -->\n)(.*?)(\n<!-- /hf_stack:{name} -->)", re.S)


def growth_section(record: dict) -> str:
    """Markdown for the growth section: what was grown from what, how, and the layer map."""
    src = record.get("source", {})
    lines = [
        f"Grown from `{src.get('name_or_path')}` ({src.get('num_layers')} layers"
        + (f", commit `{src['commit'][:12]}`" if src.get("commit") else "")
        + f") to {record['target_num_layers']} layers with the `{record['operator']}` operator "
        + f"({' and '.join(record.get('directions', ['depth']))}) "
        f"([paper]({record['paper']})); function preserving at growth: "
        f"{'yes' if record.get('function_preserving') else 'no'}.",
        "",
        *(
            ["Width grown along these axes (target units <- source units):", ""]
            + [f"- {line}" for line in record["width"].values()]
            + [""]
            if record.get("width")
            else []
        ),
        "![layer map](layer_map.png)" if record.get("_figure") else "",
        "",
        "| target layers | source layers |",
        "|---|---|",
    ]
    start = 0
    for a, b in record["layer_slices"]:
        n = b - a
        lines.append(f"| {start}-{start + n - 1} | {a}-{b - 1} |")
        start += n
    lines += ["", "<details><summary>growth_config.json</summary>", "", "```json"]
    shown = {k: v for k, v in record.items() if k not in ("training", "_figure")}
    lines += [json.dumps(shown, indent=2), "```", "", "</details>"]
    return "\n".join(lines)


def layer_map_figure(record: dict, path: str | Path) -> Path:
    """A picture of the layer map: which source layer each target layer copies (PNG, matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer_map, n_src = record["layer_map"], record.get("source_num_layers") or max(record["layer_map"]) + 1
    fig, ax = plt.subplots(figsize=(max(4, 0.25 * len(layer_map) + 1.5), max(2, 0.35 * n_src + 1)))
    ax.scatter(range(len(layer_map)), layer_map, marker="s", s=60, c=layer_map, cmap="viridis")
    ax.set_xlabel("target layer")
    ax.set_ylabel("source layer")
    ax.set_yticks(range(n_src))
    ax.set_title(f"{record.get('operator', 'stack')}: {n_src} -> {len(layer_map)} layers")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def training_section(training: dict, plot: str | None = None) -> str:
    lines = ["| phase | layers | parameters | steps | tokens | FLOPs (6ND) |", "|---|---|---|---|---|---|"]
    for p in training["phases"]:
        lines.append(
            f"| {p['phase']} | {p['num_layers']} | {p['num_parameters']:,} | {p['steps']:,} | {p['tokens']:,} | {p['flops']:.3g} |"
        )
    lines += [
        "",
        f"Total: {training['total_tokens']:,} tokens, {training['total_flops']:.3g} FLOPs ({training['flops_convention']}).",
    ]
    if (training.get("data_epochs") or 0) > 1:
        lines += ["", f"The training data ran out: the run trained on it {training['data_epochs']:.2f} times."]
    if plot:
        lines += ["", f"![training loss]({plot})"]
    return "\n".join(lines)


def _render_new(folder: Path, repo_id: str, card_data):
    from huggingface_hub import ModelCard

    if not TEMPLATE.is_file():
        raise HfStackError(f"the model card template is missing ({TEMPLATE}); reinstall hf_stack")
    name = repo_id.split("/")[-1]
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=name,
        summary=f"`{name}` was grown with hf_stack.",
        **{f"{s}_section": PLACEHOLDER[s] for s in SECTIONS},
    )


def update_card(
    folder: str | Path,
    repo_id: str | None = None,
    *,
    sections: dict[str, str] | None = None,
    eval_results: list | None = None,
    source_card: str | Path | None = None,
    figure: bool = False,
) -> Path:
    """Create or update `folder/README.md`.

    Args:
        folder: a model folder written by hf_stack.
        repo_id: the Hub id the card talks about (defaults to the folder name).
        sections: new markdown for any of "growth", "training", "evaluation"; others are left as they are.
        eval_results: `huggingface_hub.EvalResult` list; replaces the card's model-index.
        source_card: the source model's README.md, whose licence is inherited.
        figure: also draw the layer map as `layer_map.png` (matplotlib) and show it in the growth section.
    """
    from huggingface_hub import ModelCard, ModelCardData

    folder = Path(folder)
    path = folder / "README.md"
    record = json.loads((folder / GROWTH_CONFIG_NAME).read_text()) if (folder / GROWTH_CONFIG_NAME).is_file() else {}
    repo_id = repo_id or folder.resolve().name
    existing = ModelCard.load(path) if path.is_file() else None
    if existing is not None and "<!-- hf_stack:growth -->" in existing.text:
        card = existing
    else:
        source = record.get("source", {}).get("name_or_path") or ""
        license_ = None
        if source_card is not None and Path(source_card).is_file():
            license_ = ModelCard.load(source_card).data.get("license")
        tags = ["hf-stack", "model-growth"] + ([record["operator"]] if record.get("operator") else [])
        data = ModelCardData(
            library_name="transformers",
            pipeline_tag="text-generation",
            tags=tags,
            license=license_,
            # base_model must be a Hub id; local paths are not published
            base_model=source if _is_repo_id(source) else None,
        )
        card = _render_new(folder, repo_id, data)
    if record.get("layer_map") and (existing is None or figure):
        if figure:
            layer_map_figure(record, folder / "layer_map.png")
        sections = {"growth": growth_section({**record, "_figure": figure}), **(sections or {})}
    apply_updates(card, repo_id, sections, eval_results)
    card.save(path)
    return path


def apply_updates(card, repo_id: str, sections: dict[str, str] | None = None, eval_results: list | None = None):
    """Replace the named sections of a card (and its model-index); the usage section follows `repo_id`."""
    sections = {**(sections or {}), "usage": usage_section(repo_id)}
    for name, content in sections.items():
        if name not in SECTIONS:
            raise ValueError(f"unknown card section {name!r}")
        pattern = _section_pattern(name)
        if not pattern.search(card.content):  # a card hf_stack did not write: add the section once, at the end
            card.text = (
                card.text.rstrip()
                + f"\n\n## {name.capitalize()}\n\n<!-- hf_stack:{name} -->\n\n<!-- /hf_stack:{name} -->\n"
            )
        card.content = pattern.sub(lambda m, c=content: m.group(1) + c + m.group(3), card.content)
    if eval_results is not None:
        card.data.eval_results = eval_results
        card.data.model_name = repo_id.split("/")[-1]
    return card


def _is_repo_id(name: str) -> bool:
    if not name or Path(name).exists():
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(name)
    except Exception:
        return False
    return "/" in name
